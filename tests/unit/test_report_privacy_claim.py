"""The privacy claim for a silo's answers: in its audit entries and on the reviewer's page, only what is true.

Scores are post-processing of a DP output only if the model is one: the silo's
entries say so from the served model's own privacy report, and the page calls
a silo's answers post-processing only where every serving start says its model
was private, warns where one says it was not, and claims nothing where none says.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re

import pytest

from mor_secure.audit.report import render_report
from mor_secure.audit.report_view import BudgetPoint, ReportView, ServedModel, ServingStart, SiloQuery
from mor_secure.privacy import PrivacyReport
from mor_secure.privacy.training_config import NOISE_OS_ENTROPY, NOISE_SEEDED
from silo_agent.audit_trail import POST_PROCESSING, SiloAuditTrail, model_privacy

T0 = 1.9e9
PRIVATE = PrivacyReport(dp_enabled=True, epsilon=4.0, delta=1e-5, noise_multiplier=1.1, sample_rate=0.2, steps=10,
                        epochs=2, max_grad_norm=1.0, accountant="prv", privacy_unit="image", max_pairs_per_unit=None,
                        noise=NOISE_OS_ENTROPY, private=True, mechanisms=())
SEEDED = dataclasses.replace(PRIVATE, noise=NOISE_SEEDED, private=False)
DP_OFF = dataclasses.replace(PRIVATE, dp_enabled=False, epsilon=math.inf, delta=1.0, noise_multiplier=0.0,
                             max_grad_norm=None, accountant=None, privacy_unit=None, noise=None, private=False)


class ListLog:
    def __init__(self) -> None:
        self.entries: list[dict] = []

    def record(self, event) -> int:
        self.entries.append(dict(event))
        return len(self.entries)


@pytest.mark.parametrize(("report", "private", "why"), [
    (PRIVATE, True, POST_PROCESSING),
    (SEEDED, False, "the served model is NOT differentially private (its DP-SGD noise was 'seeded: not private': "
                    "its privacy report says private false)"),
    (DP_OFF, False, "the served model is NOT differentially private (trained without DP: its privacy report says "
                    "dp_enabled false)"),
    (None, False, "the served model has no privacy report tied to its weights: it is not shown to be "
                  "differentially private"),
], ids=["dp", "seeded-noise", "dp-off", "no-report"])
def test_every_entry_states_the_served_models_privacy_from_its_report(report, private: bool, why: str) -> None:
    log = ListLog()
    trail = SiloAuditTrail(log, None, served_report=report)
    trail.record({"event": "call", "rpc": "Score", "decision": "admitted"})
    privacy = log.entries[0]["privacy"]
    assert privacy["model_private"] is private and privacy["why"].startswith(why)
    # A private model's guarantee names its unit (the report's privacy_unit), so the page can say "ε per image".
    assert model_privacy(report) == {"private": private, "why": privacy["why"],
                                     **({"unit": report.privacy_unit} if private else {})}
    if not private:
        assert "post-processing" not in privacy["why"] and "no DP guarantee" in privacy["why"]
    if report is None:  # a model without a report may be private: not called NOT private, only not shown to be
        assert "NOT" not in privacy["why"]


def _view(*served: ServedModel, ledger: bool = True) -> ReportView:
    """hospital-a served from T0 and answered one query with its ledger flat; what its serving starts said."""
    budgets = tuple(BudgetPoint("hospital-a", t, 4.0, 10.0, 1e-5, 2e-5) for t in (T0, T0 + 10)) if ledger else ()
    return ReportView(title="privacy claim", generated_at=T0 + 20, parties=(), reconciliation=(),
                      queries=(SiloQuery("hospital-a", T0 + 10, "coordinator", "Score", "correct", "admitted", "OK",
                                         "", 2, 0.0),),
                      budgets=budgets, router_weights=(), rounds=(), policies=(),
                      serving_started=(ServingStart("hospital-a", T0 + 1),), served_models=served)


CLAIM = "For hospital-a: scores of a DP-trained model are post-processing"
SPEND_ONCE = "The spend was made once, when the model was trained"


def _warning(page: str) -> str | None:
    found = re.search(r'data-figure="model-not-private:hospital-a" class="bad">([^<]*)<', page)
    return found and html.unescape(found.group(1))


def test_the_page_calls_a_private_models_answers_post_processing_and_warns_of_nothing() -> None:
    page = render_report(_view(ServedModel("hospital-a", T0 + 1, True, POST_PROCESSING)))
    assert CLAIM in page and SPEND_ONCE in page and _warning(page) is None


@pytest.mark.parametrize("ledger", [True, False], ids=["ledger-flat", "no-ledger"])
@pytest.mark.parametrize("report", [SEEDED, DP_OFF], ids=["seeded-noise", "dp-off"])
def test_the_page_warns_of_a_model_that_is_not_private_and_claims_no_post_processing(report, ledger: bool) -> None:
    why = model_privacy(report)["why"]
    page = render_report(_view(ServedModel("hospital-a", T0 + 1, False, why), ledger=ledger))
    assert CLAIM not in page and SPEND_ONCE not in page
    assert _warning(page) == ("WARNING: the model hospital-a served is not shown to be differentially private: its "
                              "answers carry no DP guarantee and this page makes no privacy claim for them, whatever "
                              f"its ledger shows. Its serving start at 2030-03-17T17:46:41Z says: {why}")
    assert "NOT differentially private" in why  # the silo's own sentence says which it is


def test_one_serving_start_of_a_model_that_is_not_private_is_enough_to_withdraw_the_claim() -> None:
    page = render_report(_view(ServedModel("hospital-a", T0 + 1, True, POST_PROCESSING),
                               ServedModel("hospital-a", T0 + 5, False, model_privacy(SEEDED)["why"])))
    assert CLAIM not in page and "seeded: not private" in _warning(page)
    assert "Its serving start at 2030-03-17T17:46:45Z says" in _warning(page)  # the start that said so


def test_a_model_without_a_report_is_warned_of_and_not_called_private() -> None:
    page = render_report(_view(ServedModel("hospital-a", T0 + 1, False, model_privacy(None)["why"])))
    assert CLAIM not in page and "no privacy report tied to its weights" in _warning(page)


def test_a_log_whose_serving_starts_state_no_model_privacy_gets_no_claim() -> None:
    """A silo log from before serving starts stated it: its software called every model DP-trained."""
    page = render_report(_view())
    assert CLAIM not in page and _warning(page) is None
    assert ("For hospital-a: the ledger did not change while serving, but the log does not say whether the model "
            "served was differentially private") in page
