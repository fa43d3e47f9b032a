"""Budget reset: a coordinator names a new study-id whenever a study's budget is spent.

Each study has its own ledger, so a site that only checks the study's budget lets a coordinator
spend without bound. The site also charges every round against its ``max-total-epsilon`` over
all its studies and both DP levels, keeps an index of every ledger it wrote, and takes part
only in the studies of its ``allowed-studies``. Each attack first runs against a weakened site
(a ``SiteLimits`` with an infinite ceiling, or a site without its index) so the tests cannot
pass vacuously. Rounds are checked and recorded exactly as the DP training paths do
(``PrivacyLedger.check_budget`` then ``record_round`` for DP-SGD, ``check_client_round`` then
``record_round`` for client-level DP), without the training in between.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedrad.core.errors import ERROR_SENTENCES, ERROR_STUDY_NOT_ALLOWED
from privacy import (
    CLIENT_LEVEL_ACCOUNTANT,
    BudgetExhausted,
    ClientDPPlan,
    DPRequest,
    LedgerError,
    PrivacyLedger,
    SiteLimits,
    StudyNotAllowed,
    check_client_round,
    resolve_dp,
    site_spend,
)

pytestmark = pytest.mark.timeout(120)

SITE = "site-1"
CEILING = 30.0
WEAK = SiteLimits(max_epsilon=10.0, max_delta=1e-3)  # max_total_epsilon = inf
HONEST = SiteLimits(max_epsilon=10.0, max_delta=1e-3, max_total_epsilon=CEILING)
LEVELS = ["sample", "client"]


def spend_round(root: Path, limits: SiteLimits, level: str, study: str, server_round: int) -> None:
    """One round of ``study`` at the site: checked, then recorded, as the training paths do."""
    ledger = PrivacyLedger.open(root, study_id=study, site_id=SITE, level=level)
    if level == "sample":
        request = DPRequest(
            study_id=study,
            target_epsilon=8.0,
            max_grad_norm=1.0,
            local_epochs=1,
            planned_rounds=None,
            noise_multiplier=1.0,
            delta=1e-5,
            accountant="rdp",
        )
        plan = resolve_dp(request, limits, num_train_samples=1000, batch_size=100)
        ledger.check_budget(plan)
        entry, delta, accountant = plan.round_entry, plan.delta, plan.accountant
    else:
        client_plan = ClientDPPlan(
            study_id=study,
            target_epsilon=8.0,
            delta=1e-5,
            noise_multiplier=1.0,
            clip_norm=1.0,
            planned_rounds=10,
            derived=False,
        )
        check_client_round(plan=client_plan, limits=limits, ledger=ledger)
        entry, delta, accountant = client_plan.round_entry, 1e-5, CLIENT_LEVEL_ACCOUNTANT
    ledger.record_round(
        server_round=server_round, run_id="run", history=[entry], delta=delta, accountant=accountant
    )


def coordinator_resets(root: Path, limits: SiteLimits, level: str, studies: int = 8) -> list[str]:
    """Spend each study to its own budget, then name a new one; return the site's refusals."""
    site_refusals: list[str] = []
    for index in range(studies):
        for server_round in range(1, 100):
            try:
                spend_round(root, limits, level, f"reset-{index}", server_round)
            except BudgetExhausted as exc:
                if "over all studies" in str(exc):
                    site_refusals.append(f"reset-{index}")
                break  # this study is spent (or the site is): the coordinator resets study-id
    return site_refusals


@pytest.mark.parametrize("level", LEVELS)
def test_weakened_site_lets_a_coordinator_spend_without_bound(tmp_path, level):
    refusals = coordinator_resets(tmp_path, WEAK, level)

    total = site_spend(tmp_path, site_id=SITE).total_epsilon
    assert refusals == []
    assert total > CEILING + 20.0  # eight studies of about 7 each: the attack works


@pytest.mark.parametrize("level", LEVELS)
def test_the_site_refuses_once_its_total_would_pass_max_total_epsilon(tmp_path, level):
    refusals = coordinator_resets(tmp_path, HONEST, level)

    spend = site_spend(tmp_path, site_id=SITE)
    assert refusals and refusals[-1] == "reset-7"  # every later study is refused too
    assert spend.total_epsilon <= CEILING
    assert spend.total_epsilon > CEILING - 8.0  # it did spend up to the ceiling
    assert len({s.study_id for s in spend.studies}) >= 3


def test_both_levels_count_against_one_ceiling(tmp_path):
    coordinator_resets(tmp_path, HONEST, "sample", studies=2)
    before = site_spend(tmp_path, site_id=SITE).total_epsilon

    refusals = coordinator_resets(tmp_path, HONEST, "client", studies=8)

    spend = site_spend(tmp_path, site_id=SITE)
    assert before > 10.0 and refusals
    assert {s.level for s in spend.studies} == {"sample", "client"}
    assert spend.total_epsilon <= CEILING
    assert math.isclose(spend.total_delta, 1e-5 * len(spend.studies))  # basic composition


@pytest.mark.parametrize("level", LEVELS)
def test_a_restart_keeps_the_total(tmp_path, level):
    coordinator_resets(tmp_path, HONEST, level)
    total = site_spend(tmp_path, site_id=SITE).total_epsilon

    # Execute: a fresh process opens the same ledger folder and a new study is named
    with pytest.raises(BudgetExhausted, match="max-total-epsilon 30") as refused:
        spend_round(tmp_path, HONEST, level, "after-restart", 1)

    assert site_spend(tmp_path, site_id=SITE).total_epsilon == total
    assert refused.value.projected > CEILING and refused.value.target == CEILING
    assert "A new study-id does not start a fresh budget" in str(refused.value)


@pytest.mark.parametrize("level", LEVELS)
def test_deleting_a_ledger_is_detected_not_a_fresh_budget(tmp_path, level):
    # Prepare: a full site, then one study's ledger deleted
    coordinator_resets(tmp_path, HONEST, level)
    gone = PrivacyLedger.open(tmp_path, study_id="reset-0", site_id=SITE, level=level).path
    gone.unlink()

    # Execute / Assert: both the deleted study and any other study stop
    for study in ("reset-0", "another-study"):
        with pytest.raises(LedgerError, match="reset-0.*is missing"):
            spend_round(tmp_path, HONEST, level, study, 1)
    with pytest.raises(LedgerError, match="does not free its budget"):
        site_spend(tmp_path, site_id=SITE)


def test_without_the_index_deleting_a_ledger_would_free_budget(tmp_path):
    # The weakened site: the index removed along with the ledger (as before the index existed)
    coordinator_resets(tmp_path, HONEST, "sample")
    PrivacyLedger.open(tmp_path, study_id="reset-0", site_id=SITE).path.unlink()
    shutil.rmtree(tmp_path / "_site-index")

    spend_round(tmp_path, HONEST, "sample", "reset-0", 1)  # the attack works: it trains again

    assert site_spend(tmp_path, site_id=SITE).total_epsilon <= CEILING  # still bounded


def test_a_rolled_back_ledger_is_detected(tmp_path):
    # Prepare: a copy of the ledger after round 1 put back after round 2
    spend_round(tmp_path, HONEST, "sample", "study-a", 1)
    path = PrivacyLedger.open(tmp_path, study_id="study-a", site_id=SITE).path
    old = path.read_bytes()
    spend_round(tmp_path, HONEST, "sample", "study-a", 2)
    path.write_bytes(old)

    # Execute / Assert
    with pytest.raises(LedgerError, match="rolled back"):
        spend_round(tmp_path, HONEST, "sample", "study-a", 3)


def test_a_damaged_index_stops_training(tmp_path):
    spend_round(tmp_path, HONEST, "client", "study-a", 1)
    index = tmp_path / "_site-index" / f"{SITE}.json"
    record = json.loads(index.read_text())
    record["studies"][0]["epsilon"] = "0"
    index.write_text(json.dumps(record))

    with pytest.raises(LedgerError, match="index .* is damaged"):
        spend_round(tmp_path, HONEST, "client", "study-b", 1)


# ------------------------------------------------------------------------- allowed-studies


@pytest.mark.parametrize("level", LEVELS)
def test_a_study_outside_allowed_studies_is_refused(tmp_path, level):
    allowed = SiteLimits(
        max_epsilon=10.0, max_delta=1e-3, max_total_epsilon=CEILING, allowed_studies=("study-a",)
    )
    spend_round(tmp_path, WEAK, level, "study-b", 1)  # weakened: any study may spend

    spend_round(tmp_path, allowed, level, "study-a", 1)
    with pytest.raises(StudyNotAllowed, match="'study-c' is not in this site's allowed-studies"):
        spend_round(tmp_path, allowed, level, "study-c", 1)

    assert {s.study_id for s in site_spend(tmp_path, site_id=SITE).studies} == {
        "study-a",
        "study-b",
    }


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


@pytest.mark.parametrize(("allowed", "refused"), [("", False), ("study-a, study-b", True)])
def test_the_client_app_refuses_a_study_before_any_work(tmp_path, task_identity, allowed, refused):
    from client.app import train

    msg = Message(
        RecordDict({"config": ConfigRecord({"study-id": "study-z"})}),
        dst_node_id=1,
        message_type="train",
    )
    node = {"data-dir": str(tmp_path / "no-such-site"), "allowed-studies": allowed}
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config=node)

    reply = train(msg, ctx)

    assert reply.has_error()
    # the weakened site (no allow-list) goes on to the request and fails there instead
    assert (reply.error.code == ERROR_STUDY_NOT_ALLOWED) is refused
    if refused:
        assert reply.error.reason == ERROR_SENTENCES[ERROR_STUDY_NOT_ALLOWED]
