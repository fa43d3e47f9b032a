"""The privacy ledger, the request/limits/plan contract and the accounting helpers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fedrad.core.config import NodeConfig, RunConfig
from fedrad.core.errors import ConfigError, FedradError
from privacy import (
    BudgetExhausted,
    DPPlan,
    DPRequest,
    LedgerError,
    PrivacyLedger,
    PrivacyRefused,
    SiteLimits,
    compute_epsilon,
    history_delta,
    resolve_dp,
)

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
LIMITS = SiteLimits(max_epsilon=20.0, max_delta=1e-4)


def make_plan(
    *,
    noise: float | None = 1.5,
    accountant: str = "rdp",
    target: float = 20.0,
    delta: float | None = 1e-5,
    samples: int = 2500,
    batch: int = 100,
    epochs: int = 1,
    rounds: int | None = None,
    study: str = "study-a",
) -> DPPlan:
    request = DPRequest(
        study_id=study,
        target_epsilon=target,
        max_grad_norm=1.0,
        local_epochs=epochs,
        planned_rounds=rounds,
        noise_multiplier=noise,
        delta=delta,
        accountant=accountant,
    )
    return resolve_dp(request, LIMITS, num_train_samples=samples, batch_size=batch)


def record(ledger: PrivacyLedger, plan: DPPlan, steps: int, server_round: int) -> float:
    return ledger.record_round(
        server_round=server_round,
        run_id="run-1",
        history=[(plan.noise_multiplier, plan.sample_rate, steps)],
        delta=plan.delta,
        accountant=plan.accountant,
    )


# ---------------------------------------------------------------- Opacus reference values


@pytest.mark.parametrize(
    ("accountant", "splits", "expected"),
    [
        ("rdp", (2250,), 7.32911117143),
        ("rdp", (1000, 1250), 7.32911117143),
        ("rdp", (750, 750, 750), 7.32911117143),
        # Opacus' PRV test uses int(90 // 0.04) = 2249 steps (floor division of floats), not 2250.
        ("prv", (2249,), 6.777395712),
        ("prv", (1000, 1249), 6.777395712),
    ],
)
def test_ledger_reproduces_opacus_reference_epsilon(
    tmp_path: Path, accountant: str, splits: tuple[int, ...], expected: float
) -> None:
    # Prepare
    plan = make_plan(accountant=accountant)
    assert plan.sample_rate == 0.04

    # Execute: record round by round, re-opening the ledger from disk in between
    for server_round, steps in enumerate(splits, start=1):
        ledger = PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1")
        last = record(ledger, plan, steps, server_round)
    reopened = PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1")

    # Assert
    assert reopened.history == ((1.5, 0.04, sum(splits)),)
    assert last == pytest.approx(expected, abs=1e-6)
    assert reopened.spent_epsilon == last
    assert reopened.epsilon(delta=1e-5, accountant=accountant) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("rounds", "epochs"), [(90, 1), (30, 3)])
def test_resolve_derives_opacus_noise_multiplier(rounds: int, epochs: int) -> None:
    # Prepare: q = 100 / 2500 = 0.04, 90 epochs = 2250 steps
    request = DPRequest(
        study_id="study-a",
        target_epsilon=8.0,
        max_grad_norm=1.0,
        local_epochs=epochs,
        planned_rounds=rounds,
        delta=1e-5,
    )

    # Execute
    plan = resolve_dp(request, LIMITS, num_train_samples=2500, batch_size=100)

    # Assert
    assert plan.noise_multiplier == pytest.approx(1.416015625, abs=1e-6)
    assert plan.steps_per_round * rounds == 2250


def test_derived_noise_fits_what_earlier_runs_left(tmp_path: Path) -> None:
    # Prepare: an earlier run of the study spent part of the budget
    ledger = PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1")
    record(ledger, make_plan(noise=1.0), steps=500, server_round=1)
    request = DPRequest(
        study_id="study-a",
        target_epsilon=8.0,
        max_grad_norm=1.0,
        local_epochs=1,
        planned_rounds=10,
        delta=1e-5,
    )

    # Execute
    fresh = resolve_dp(request, LIMITS, num_train_samples=2500, batch_size=100)
    later = resolve_dp(
        request,
        LIMITS,
        num_train_samples=2500,
        batch_size=100,
        study_delta=ledger.delta,
        prior_history=ledger.history_before("run-2"),
    )

    # Assert
    assert later.noise_multiplier > fresh.noise_multiplier
    planned = (later.noise_multiplier, later.sample_rate, 10 * later.steps_per_round)
    total = ledger.history + (planned,)
    assert compute_epsilon(total, delta=1e-5, accountant="rdp") <= 8.0
    assert ledger.history_before("run-1") == ()


# ---------------------------------------------------------------- monotone across restarts

round_strategy = st.tuples(
    st.integers(min_value=1, max_value=300),
    st.floats(min_value=0.5, max_value=5.0),
    st.sampled_from([0.01, 0.1, 0.5, 1.0]),
    st.booleans(),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds=st.lists(round_strategy, min_size=1, max_size=6))
def test_cumulative_epsilon_never_decreases_across_rounds_and_restarts(
    rounds: list[tuple[int, float, float, bool]],
) -> None:
    # Prepare
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger.open(Path(tmp), study_id="study-a", site_id="site-1")
        seen = [0.0]

        # Execute
        for server_round, (steps, noise, rate, restart) in enumerate(rounds):
            if restart:
                ledger = PrivacyLedger.open(Path(tmp), study_id="study-a", site_id="site-1")
                assert ledger.spent_epsilon == seen[-1]
            seen.append(
                ledger.record_round(
                    server_round=server_round,
                    run_id="run-1",
                    history=[(noise, rate, steps)],
                    delta=1e-5,
                    accountant="rdp",
                )
            )
        reopened = PrivacyLedger.open(Path(tmp), study_id="study-a", site_id="site-1")

    # Assert
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False))
    assert [r.epsilon for r in reopened.rounds] == seen[1:]


# ---------------------------------------------------------------- corrupt ledgers


def corrupt_bad_json(path: Path) -> None:
    path.write_text("{not json")


def corrupt_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def corrupt_empty(path: Path) -> None:
    path.write_bytes(b"")


def corrupt_not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe\x00garbage")


def edit(path: Path, change: Callable[[dict], object]) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def corrupt_last_epsilon(path: Path) -> None:
    edit(path, lambda r: r["rounds"][-1].__setitem__("epsilon", r["rounds"][-1]["epsilon"] + 0.5))


def corrupt_middle_epsilon(path: Path) -> None:
    def lower(r: dict) -> None:
        r["rounds"][1]["epsilon"] = (r["rounds"][0]["epsilon"] + r["rounds"][1]["epsilon"]) / 2

    edit(path, lower)


def corrupt_fewer_steps_everywhere(path: Path) -> None:
    def shrink(r: dict) -> None:  # consistent history, but it no longer gives the epsilons
        for entry in r["rounds"]:
            entry["history"][0][2] = 1
            entry["steps"] = 1
        r["history"][0][2] = len(r["rounds"])

    edit(path, shrink)


def corrupt_header_history(path: Path) -> None:
    edit(path, lambda r: r["history"][0].__setitem__(2, 1))


def corrupt_schema_version(path: Path) -> None:
    edit(path, lambda r: r.__setitem__("version", 99))


def corrupt_extra_key(path: Path) -> None:
    edit(path, lambda r: r.__setitem__("note", "edited by hand"))


def corrupt_wrong_study(path: Path) -> None:
    edit(path, lambda r: r.__setitem__("study_id", "study-b"))


def corrupt_wrong_site(path: Path) -> None:
    edit(path, lambda r: r.__setitem__("site_id", "site-9"))


def corrupt_negative_noise(path: Path) -> None:
    edit(path, lambda r: r["rounds"][0]["history"][0].__setitem__(0, -1.0))


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_bad_json,
        corrupt_truncated,
        corrupt_empty,
        corrupt_not_utf8,
        corrupt_last_epsilon,
        corrupt_middle_epsilon,
        corrupt_fewer_steps_everywhere,
        corrupt_header_history,
        corrupt_schema_version,
        corrupt_extra_key,
        corrupt_wrong_study,
        corrupt_wrong_site,
        corrupt_negative_noise,
    ],
)
def test_corrupt_ledger_raises_and_is_left_alone(
    tmp_path: Path, corrupt: Callable[[Path], None]
) -> None:
    # Prepare: three honest rounds, then damage the file
    ledger = PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1")
    plan = make_plan()
    for server_round in range(3):
        record(ledger, plan, 100, server_round)
    corrupt(ledger.path)
    damaged = ledger.path.read_bytes()

    # Execute / Assert
    with pytest.raises(LedgerError, match="Restore the ledger from a backup"):
        PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1")
    assert ledger.path.read_bytes() == damaged


def test_ledger_of_another_study_copied_in_is_refused(tmp_path: Path) -> None:
    # Prepare: study-b's file placed where study-a's belongs
    ledger = PrivacyLedger.open(tmp_path, study_id="study-b", site_id="site-1")
    record(ledger, make_plan(study="study-b"), 100, 1)
    target = tmp_path / "study-a" / "site-1.json"
    target.parent.mkdir()
    target.write_bytes(ledger.path.read_bytes())

    # Execute / Assert
    with pytest.raises(LedgerError, match="belongs to study 'study-b'"):
        PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1")


def test_crash_before_replace_keeps_old_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    ledger = PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1")
    plan = make_plan()
    spent = record(ledger, plan, 100, 1)
    before = ledger.path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated power cut")

    monkeypatch.setattr(os, "replace", crash)  # fedrad.core.durable renames with os.replace

    # Execute
    with pytest.raises(LedgerError, match="keeps its previous state"):
        record(ledger, plan, 100, 2)
    monkeypatch.undo()

    # Assert
    assert ledger.path.read_bytes() == before
    assert ledger.spent_epsilon == spent
    assert list(ledger.path.parent.glob("*.tmp")) == []
    assert PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1").spent_epsilon == spent
    assert record(ledger, plan, 100, 2) > spent  # the in-memory ledger is still usable


def test_ledger_changed_by_another_process_refuses_to_record(tmp_path: Path) -> None:
    # Prepare: two handles on one ledger; the second one records first
    first = PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1")
    second = PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1")
    plan = make_plan()
    record(second, plan, 100, 1)

    # Execute / Assert
    with pytest.raises(LedgerError, match="changed on disk"):
        record(first, plan, 100, 1)
    assert len(PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1").rounds) == 1


@pytest.mark.parametrize(("study", "site"), [("../etc", "site-1"), ("study-a", "a/b"), ("", "s")])
def test_unsafe_identifiers_are_rejected(tmp_path: Path, study: str, site: str) -> None:
    with pytest.raises(ConfigError, match="letters, digits"):
        PrivacyLedger.open(tmp_path, study_id=study, site_id=site)


# ---------------------------------------------------------------- ceilings and budget


@pytest.mark.parametrize(
    ("target", "delta", "samples", "message"),
    [
        (25.0, 1e-5, 2500, "above this site's max-epsilon 20"),
        (8.0, 2e-4, 2500, "above this site's max-delta 0.0001"),
        (8.0, 1e-4, 20_000, "not below 1/N"),
    ],
)
def test_site_refuses_requests_above_its_ceilings(
    target: float, delta: float, samples: int, message: str
) -> None:
    # Prepare
    request = DPRequest(
        study_id="study-a",
        target_epsilon=target,
        max_grad_norm=1.0,
        local_epochs=1,
        noise_multiplier=1.0,
        delta=delta,
    )

    # Execute / Assert
    with pytest.raises(PrivacyRefused, match=message):
        resolve_dp(request, LIMITS, num_train_samples=samples, batch_size=100)


def test_default_delta_is_a_tenth_of_one_over_n_within_the_ceiling() -> None:
    # Prepare
    request = DPRequest(
        study_id="study-a",
        target_epsilon=8.0,
        max_grad_norm=1.0,
        local_epochs=1,
        noise_multiplier=1.0,
    )

    # Execute
    large = resolve_dp(request, LIMITS, num_train_samples=100_000, batch_size=100)
    small = resolve_dp(request, LIMITS, num_train_samples=200, batch_size=100)

    # Assert
    assert large.delta == pytest.approx(1e-6)
    assert small.delta == LIMITS.max_delta  # 1/(10 N) = 5e-4 would exceed max-delta


def test_budget_hard_stop_names_spent_and_target(tmp_path: Path) -> None:
    # Prepare: rounds of 250 steps while the next one still fits in epsilon 5
    plan = make_plan(target=5.0, epochs=10)  # 10 epochs x 25 steps = 250 steps per round
    ledger = PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1")
    for server_round in range(1, 50):
        try:
            ledger.check_budget(plan)
        except BudgetExhausted:
            break
        record(ledger, plan, plan.steps_per_round, server_round)
    ledger = PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1")

    # Execute
    with pytest.raises(BudgetExhausted) as caught:
        ledger.check_budget(plan)

    # Assert
    error = caught.value
    assert isinstance(error, PrivacyRefused) and isinstance(error, FedradError)
    assert error.spent == ledger.spent_epsilon <= 5.0 < error.projected
    assert error.target == 5.0
    assert f"spent epsilon {ledger.spent_epsilon:.4f} of target 5" in str(error)
    assert "Spent budget is never reset" in str(error)


@pytest.mark.parametrize(
    ("delta", "accountant", "message"),
    [(2e-5, "rdp", "accounted at delta 1e-05"), (1e-5, "prv", "with the rdp accountant")],
)
def test_study_keeps_its_first_delta_and_accountant(
    tmp_path: Path, delta: float, accountant: str, message: str
) -> None:
    # Prepare
    ledger = PrivacyLedger.open(tmp_path, study_id="study-a", site_id="site-1")
    record(ledger, make_plan(), 100, 1)
    other = make_plan(delta=delta, accountant=accountant)

    # Execute / Assert
    with pytest.raises(PrivacyRefused, match=message):
        ledger.check_budget(other)
    with pytest.raises(PrivacyRefused, match=message):
        record(ledger, other, 100, 2)


def test_resolve_refuses_a_delta_other_than_the_studys() -> None:
    request = DPRequest(
        study_id="study-a",
        target_epsilon=8.0,
        max_grad_norm=1.0,
        local_epochs=1,
        noise_multiplier=1.0,
        delta=2e-5,
    )
    with pytest.raises(PrivacyRefused, match="accounted at delta 1e-05"):
        resolve_dp(request, LIMITS, num_train_samples=2500, batch_size=100, study_delta=1e-5)


def test_derivation_with_a_spent_budget_is_exhausted() -> None:
    # Prepare: the prior history alone spends more than the target
    request = DPRequest(
        study_id="study-a",
        target_epsilon=1.0,
        max_grad_norm=1.0,
        local_epochs=1,
        planned_rounds=5,
        delta=1e-5,
    )

    # Execute / Assert
    with pytest.raises(BudgetExhausted, match="already spent"):
        resolve_dp(
            request,
            LIMITS,
            num_train_samples=2500,
            batch_size=100,
            prior_history=[(0.8, 0.04, 2000)],
        )


# ---------------------------------------------------------------- request validation


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"study_id": ""}, "study-id"),
        ({"target_epsilon": 0.0}, "target-epsilon"),
        ({"target_epsilon": math.inf}, "target-epsilon"),
        ({"max_grad_norm": -1.0}, "max-grad-norm"),
        ({"local_epochs": 0}, "local-epochs"),
        ({"noise_multiplier": None, "planned_rounds": None}, "Give either 'noise-multiplier'"),
        ({"delta": 1.0}, "delta"),
        ({"accountant": "gdp"}, "dp-accountant"),
    ],
)
def test_invalid_request_says_what_is_wrong(changes: dict, message: str) -> None:
    fields = {
        "study_id": "study-a",
        "target_epsilon": 8.0,
        "max_grad_norm": 1.0,
        "local_epochs": 1,
        "noise_multiplier": 1.0,
    } | changes
    with pytest.raises(ConfigError, match=message):
        DPRequest(**fields)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max-epsilon": 0, "max-delta": 1e-5}, "'max-epsilon' must be positive"),
        ({"max-epsilon": 8, "max-delta": 2}, "max-delta"),
    ],
)
def test_site_limits_from_node_config_check_both_ceilings(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SiteLimits.from_node_config(NodeConfig.from_user_config(values))


def test_site_limits_come_from_the_node_config_or_its_defaults() -> None:
    # Execute
    given_limits = SiteLimits.from_node_config(
        NodeConfig.from_user_config(
            {
                "max-epsilon": 4,
                "max-delta": 1e-5,
                "max-total-epsilon": 12,
                "allowed-studies": "study-a, study-b",
            }
        )
    )
    default_limits = SiteLimits.from_node_config(NodeConfig())

    # Assert
    assert given_limits == SiteLimits(
        max_epsilon=4.0,
        max_delta=1e-5,
        max_total_epsilon=12.0,
        allowed_studies=("study-a", "study-b"),
    )
    assert default_limits == SiteLimits(
        max_epsilon=NodeConfig().max_epsilon,
        max_delta=NodeConfig().max_delta,
        max_total_epsilon=NodeConfig().max_total_epsilon,
    )
    assert math.isfinite(default_limits.max_total_epsilon)  # a deployed site is always bounded


def test_request_from_run_config_maps_unset_to_none() -> None:
    # Prepare
    config = RunConfig(
        dp="sample",
        study_id="study-a",
        target_epsilon=8.0,
        max_grad_norm=1.0,
        local_epochs=2,
        num_server_rounds=10,
        noise_multiplier=0.0,
        delta=0.0,
    )

    # Execute
    request = DPRequest.from_run_config(config)

    # Assert
    assert (request.noise_multiplier, request.delta, request.planned_rounds) == (None, None, 10)
    assert request.accountant == "rdp"


# ---------------------------------------------------------------- history maths


@pytest.mark.parametrize(
    ("prior", "current", "added"),
    [
        ([], [(1.0, 0.1, 5)], ((1.0, 0.1, 5),)),
        ([(1.0, 0.1, 5)], [(1.0, 0.1, 9)], ((1.0, 0.1, 4),)),
        ([(1.0, 0.1, 5)], [(1.0, 0.1, 5), (2.0, 0.1, 3)], ((2.0, 0.1, 3),)),
    ],
)
def test_history_delta_finds_what_a_seeded_accountant_added(
    prior: list, current: list, added: tuple
) -> None:
    assert history_delta(prior, current) == added


def test_history_delta_rejects_a_rewritten_history() -> None:
    with pytest.raises(LedgerError, match="does not extend"):
        history_delta([(1.0, 0.1, 5)], [(1.0, 0.1, 3)])


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 0.05, 15), (1.1, 0.05, 25)],
        [(1.1, 0.05, 15), (0.7, 0.25, 3), (1.1, 0.05, 25)],
        [(3.0, 1.0, 7)],
    ],
)
def test_rdp_epsilon_is_the_accountants_own_bit_for_bit(history: list) -> None:
    # Prepare: an Opacus accountant stepped one step at a time
    accountant = RDPAccountant()
    for noise, rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)

    # Execute
    ours = compute_epsilon(history, delta=1e-5, accountant="rdp")

    # Assert
    assert ours == accountant.get_epsilon(delta=1e-5)


def test_import_privacy_leaves_opacus_unimported() -> None:
    # Execute: a fresh interpreter, so that no other test has imported Opacus yet
    code = "import sys, privacy; print(sorted(m for m in ('opacus', 'torch') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )

    # Assert
    assert result.stdout.strip() == "[]"
