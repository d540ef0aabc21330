"""A silo's serving policy: what it accepts, from whom, how much (schema), and the decisions it makes (engine)."""

from .engine import SiloAdmission
from .schema import RateLimit, RequestLimits, SiloPolicy, default_allowed_callers, load_policy

__all__ = ["RateLimit", "RequestLimits", "SiloAdmission", "SiloPolicy", "default_allowed_callers", "load_policy"]
