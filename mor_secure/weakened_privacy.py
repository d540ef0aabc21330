"""The loud warning of a run whose privacy is weaker than the defaults: DP off, seeded noise, per-pair units.

Said twice on purpose: as a `WeakenedPrivacyWarning` (a UserWarning, for
library users and tests) and as a log line (for operators reading a silo's
log). The command line, which shows both, ignores the warning category and
keeps the log line, so it says each once. Apart from `mor_secure.privacy`,
whose package imports Opacus, so that the CLI can name the category before
importing anything heavy.
"""

from __future__ import annotations

import logging
import warnings

logger = logging.getLogger(__name__)


class WeakenedPrivacyWarning(UserWarning):
    """A run or setting that gives less privacy than mor-secure's defaults."""


def warn_weakened_privacy(message: str) -> None:
    warnings.warn(message, WeakenedPrivacyWarning, stacklevel=3)
    logger.warning(message)
