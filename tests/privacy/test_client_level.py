"""Client-level (distributed) DP: the derived noise, the site's ledger, its refusals, the config."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedrad.core.config import RunConfig
from fedrad.core.errors import ConfigError
from privacy import (
    CLIENT_LEVEL_DELTA,
    BudgetExhausted,
    ClientDPPlan,
    LedgerError,
    PrivacyLedger,
    PrivacyRefused,
    SiteLimits,
    client_noise_multiplier,
    planned_client_epsilon,
    privatize_update,
)
from privacy.distributed import GridSensitivity
from server.loop import Federation

pytestmark = pytest.mark.timeout(120)

LIMITS = SiteLimits(max_epsilon=10.0, max_delta=1e-3)
GLOBAL = {"w": np.zeros((4, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
TRAINED = {"w": np.full((4, 3), 0.5, dtype=np.float32), "b": np.ones(3, dtype=np.float32)}
OPACUS_TOLERANCE = 0.01  # get_noise_multiplier's default epsilon_tolerance


def run_config(**changes: object) -> RunConfig:
    base: dict[str, object] = {
        "dp": "client",
        "secure_aggregation": True,
        "min_sites": 3,
        "study_id": "chest-2026",
    }
    return RunConfig(**{**base, **changes})  # type: ignore[arg-type]


def make_plan(**changes: object) -> ClientDPPlan:
    return ClientDPPlan.from_run_config(run_config(**changes))


def open_ledger(root: Path, site_id: str = "site-a") -> PrivacyLedger:
    return PrivacyLedger.open(root, study_id="chest-2026", site_id=site_id, level="client")


def contribute(
    root: Path, plan: ClientDPPlan, server_round: int, *, limits: SiteLimits = LIMITS
) -> float:
    """One round at a site as client/app.py runs it: open the ledger, privatize, record."""
    private = privatize_update(
        GLOBAL,
        TRAINED,
        plan=plan,
        threshold=3,
        min_threshold=2,
        clipping_range=1.0,
        quantisation_bits=16,
        limits=limits,
        ledger=open_ledger(root),
        server_round=server_round,
        run_id="run-1",
    )
    return private.epsilon


# ---------------------------------------------------------------- the derived noise multiplier


@pytest.mark.parametrize(
    ("target", "delta", "rounds"),
    [(8.0, 1e-5, 12), (1.0, 1e-5, 12), (3.0, 1e-6, 50), (20.0, 1e-4, 1), (0.5, 1e-5, 200)],
)
def test_derived_multiplier_reaches_the_target_and_never_exceeds_it(
    target: float, delta: float, rounds: int
) -> None:
    # Execute
    noise = client_noise_multiplier(target_epsilon=target, delta=delta, rounds=rounds)

    # Assert: Opacus' own search and accountant, one step per round at sample rate 1
    accountant = RDPAccountant()
    accountant.history = [(noise, 1.0, rounds)]
    epsilon = accountant.get_epsilon(delta=delta)
    assert noise == get_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=1.0, steps=rounds, accountant="rdp"
    )
    assert target - OPACUS_TOLERANCE <= epsilon <= target


def test_plan_derives_the_multiplier_from_the_run_config_only() -> None:
    # Execute
    derived = make_plan()
    explicit = make_plan(noise_multiplier=1.3, delta=1e-6)

    # Assert: the default plan is 12 rounds at target 8, delta 1e-5
    assert derived.derived and not explicit.derived
    assert derived.delta == CLIENT_LEVEL_DELTA
    assert derived.noise_multiplier == pytest.approx(2.2095, abs=1e-4)
    assert planned_client_epsilon(
        noise_multiplier=derived.noise_multiplier, rounds=12, delta=derived.delta
    ) == pytest.approx(8.0, abs=OPACUS_TOLERANCE)
    assert (explicit.noise_multiplier, explicit.delta) == (1.3, 1e-6)


def test_coordinator_reports_what_a_site_in_every_round_records(tmp_path: Path) -> None:
    # Prepare: the coordinator's per-round figure needs only its run config
    config = run_config(num_server_rounds=4)
    plan = ClientDPPlan.from_run_config(config)
    coordinator = SimpleNamespace(config=config, client_plan=plan)

    # Execute
    epsilon_after = Federation._client_level_epsilon
    reported = [epsilon_after(coordinator, r) for r in range(1, 5)]  # type: ignore[arg-type]
    recorded = [contribute(tmp_path, plan, r) for r in range(1, 5)]

    # Assert
    assert [r["client-level-epsilon"] for r in reported] == pytest.approx(recorded, rel=1e-9)
    assert all(r["noise-multiplier"] == plan.noise_multiplier for r in reported)
    assert reported[-1]["client-level-epsilon"] <= 8.0


def test_coordinator_resolves_the_plan_once_per_run() -> None:
    # Prepare
    config = run_config(num_server_rounds=4)

    # Execute: the round loop needs neither a grid nor a run directory to be built
    federation = Federation(None, config, None)  # type: ignore[arg-type]
    plain = Federation(None, RunConfig(), None)  # type: ignore[arg-type]

    # Assert
    assert federation.client_plan == ClientDPPlan.from_run_config(config)
    assert plain.client_plan is None and plain._client_level_epsilon(1) == {}


# ---------------------------------------------------------------- the site's client-level ledger


def test_ledger_is_cumulative_across_a_restart_and_a_later_run(tmp_path: Path) -> None:
    # Prepare: the default plan, 12 rounds
    plan = make_plan()

    # Execute: rounds 1-5, a node restart (a fresh ledger object each round), rounds 6-12
    spent = [contribute(tmp_path, plan, r) for r in range(1, 13)]
    reopened = open_ledger(tmp_path)

    # Assert: cumulative, as the accountant over all rounds; round 13 (a later run) is refused
    expected = [
        planned_client_epsilon(noise_multiplier=plan.noise_multiplier, rounds=r, delta=plan.delta)
        for r in range(1, 13)
    ]
    assert spent == pytest.approx(expected, rel=1e-9)
    assert reopened.spent_epsilon == spent[-1] and len(reopened.rounds) == 12
    assert reopened.history == ((plan.noise_multiplier, 1.0, 12),)
    with pytest.raises(BudgetExhausted, match="exhausted"):
        contribute(tmp_path, plan, 1)
    assert len(open_ledger(tmp_path).rounds) == 12  # the refused round was not recorded


@settings(max_examples=25, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(st.sampled_from([2.0, 3.5, 8.0]), st.booleans()), min_size=1, max_size=8
    )
)
def test_ledger_epsilon_never_decreases(rounds: list[tuple[float, bool]]) -> None:
    # Prepare: a generous budget; each round picks a noise and whether the node restarts after
    limits = SiteLimits(max_epsilon=1000.0, max_delta=1e-3)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        previous = 0.0
        ledger = open_ledger(root)
        for server_round, (noise, restart) in enumerate(rounds, start=1):
            plan = make_plan(noise_multiplier=noise, target_epsilon=1000.0)

            # Execute
            epsilon = privatize_update(
                GLOBAL,
                TRAINED,
                plan=plan,
                threshold=3,
                min_threshold=2,
                clipping_range=1.0,
                quantisation_bits=16,
                limits=limits,
                ledger=ledger,
                server_round=server_round,
                run_id="run-1",
            ).epsilon
            if restart:
                ledger = open_ledger(root)

            # Assert
            assert epsilon >= previous
            assert open_ledger(root).spent_epsilon == epsilon
            previous = epsilon


def test_client_and_sample_ledgers_are_separate(tmp_path: Path) -> None:
    # Prepare
    plan = make_plan()
    contribute(tmp_path, plan, 1)
    client = open_ledger(tmp_path)
    sample = PrivacyLedger.open(tmp_path, study_id="chest-2026", site_id="site-a")

    # Execute: a client-level ledger copied where the sample-level one lives
    sample.path.parent.mkdir(parents=True, exist_ok=True)
    sample.path.write_bytes(client.path.read_bytes())

    # Assert
    assert client.path != sample.path and sample.rounds == ()
    with pytest.raises(LedgerError, match="fedrad-client-level-ledger"):
        PrivacyLedger.open(tmp_path, study_id="chest-2026", site_id="site-a")
    with pytest.raises(PrivacyRefused, match="client-level ledger"):
        privatize_update(
            GLOBAL,
            TRAINED,
            plan=plan,
            threshold=3,
            min_threshold=2,
            clipping_range=1.0,
            quantisation_bits=16,
            limits=LIMITS,
            ledger=PrivacyLedger.open(tmp_path / "fresh", study_id="chest-2026", site_id="s"),
            server_round=2,
            run_id="run-1",
        )


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: r["rounds"][-1].update(epsilon=r["rounds"][-1]["epsilon"] / 2),
        lambda r: r["rounds"].pop(),
        lambda r: r.update(delta=1e-3),
    ],
    ids=["lower-epsilon", "dropped-round", "other-delta"],
)
def test_tampered_client_level_ledger_refuses(tmp_path: Path, tamper) -> None:
    # Prepare
    plan = make_plan()
    for server_round in (1, 2, 3):
        contribute(tmp_path, plan, server_round)
    path = open_ledger(tmp_path).path
    record = json.loads(path.read_text())

    # Execute
    tamper(record)
    path.write_text(json.dumps(record))

    # Assert
    with pytest.raises(LedgerError, match="Restore the ledger from a backup"):
        contribute(tmp_path, plan, 4)


def test_unreadable_client_level_ledger_refuses(tmp_path: Path) -> None:
    # Prepare
    contribute(tmp_path, make_plan(), 1)
    open_ledger(tmp_path).path.write_bytes(b"\x00not json")

    # Execute / Assert
    with pytest.raises(LedgerError, match="not valid JSON"):
        open_ledger(tmp_path)


# ---------------------------------------------------------------- the site's refusals


def test_site_refuses_the_round_that_would_exceed_its_budget(tmp_path: Path) -> None:
    # Prepare: explicit noise 2.0 spends more than target 6 over 12 rounds
    plan = make_plan(noise_multiplier=2.0, target_epsilon=6.0)
    fits = [
        r
        for r in range(1, 13)
        if planned_client_epsilon(noise_multiplier=2.0, rounds=r, delta=plan.delta) <= 6.0
    ]

    # Execute
    spent = [contribute(tmp_path, plan, r) for r in fits]
    with pytest.raises(BudgetExhausted, match="max-epsilon") as refused:
        contribute(tmp_path, plan, len(fits) + 1)

    # Assert: the last round that fits was trained, the next refused and not recorded
    assert 0 < len(fits) < 12 and spent[-1] <= 6.0
    assert refused.value.spent == spent[-1] and refused.value.projected > 6.0
    assert open_ledger(tmp_path).spent_epsilon == spent[-1]


def test_later_run_of_the_study_is_refused_once_its_budget_is_spent(tmp_path: Path) -> None:
    # Prepare: a 3-round run spends target 8, all this site's max-epsilon allows
    limits = SiteLimits(max_epsilon=8.0, max_delta=1e-3)
    plan = make_plan(num_server_rounds=3)
    for server_round in (1, 2, 3):
        contribute(tmp_path, plan, server_round, limits=limits)

    # Execute / Assert: a second run of the same study would pass 8
    with pytest.raises(BudgetExhausted, match="max-epsilon 8"):
        contribute(tmp_path, plan, 1, limits=limits)


@pytest.mark.parametrize(
    ("changes", "limits", "message"),
    [
        ({"target_epsilon": 12.0}, LIMITS, "above this site's max-epsilon 10"),
        ({"delta": 1e-2}, LIMITS, "above this site's max-delta"),
        ({}, SiteLimits(max_epsilon=10.0, max_delta=1e-6), "above this site's max-delta"),
    ],
)
def test_site_refuses_a_run_that_asks_for_more(
    tmp_path: Path, changes: dict, limits: SiteLimits, message: str
) -> None:
    # Prepare
    plan = make_plan(**changes)

    # Execute / Assert: refused whatever the coordinator says, nothing recorded
    with pytest.raises(PrivacyRefused, match=message):
        contribute(tmp_path, plan, 1, limits=limits)
    assert open_ledger(tmp_path).rounds == ()


@pytest.mark.parametrize(("threshold", "minimum"), [(0, 2), (1, 2), (3, 4), (2, 5)])
def test_site_refuses_a_threshold_below_its_own_minimum(
    tmp_path: Path, threshold: int, minimum: int
) -> None:
    with pytest.raises(PrivacyRefused, match="secagg-min-threshold"):
        privatize_update(
            GLOBAL,
            TRAINED,
            plan=make_plan(),
            threshold=threshold,
            min_threshold=minimum,
            clipping_range=1.0,
            quantisation_bits=16,
            limits=LIMITS,
            ledger=open_ledger(tmp_path),
            server_round=1,
            run_id="run-1",
        )
    assert open_ledger(tmp_path).rounds == ()  # nothing charged


@pytest.mark.parametrize("threshold", [2, 4, 9])
def test_noise_share_is_sized_by_the_verified_threshold(tmp_path: Path, threshold: int) -> None:
    # Prepare: sensitivity on the 16-bit grid of range 1: C s + sqrt(d)
    plan = make_plan(noise_multiplier=1.5, max_grad_norm=0.2, target_epsilon=10.0)
    grid = GridSensitivity.of(clip_norm=0.2, clipping_range=1.0, bits=16, dim=16)

    # Execute
    private = privatize_update(
        GLOBAL,
        TRAINED,
        plan=plan,
        threshold=threshold,
        min_threshold=2,
        clipping_range=1.0,
        quantisation_bits=16,
        extra={"loss": np.zeros(1)},
        limits=LIMITS,
        ledger=open_ledger(tmp_path / str(threshold)),
        server_round=1,
        run_id="run-1",
    )

    # Assert: t shares of this std carry at least the full noise z * l2
    assert grid.l2 == pytest.approx(0.2 * 65535 / 2 + 4.0)
    assert private.share_std == pytest.approx(1.5 * grid.l2 / threshold**0.5, rel=1e-9)
    assert private.noise.dtype == np.int64 and private.noise.size == 16
    assert np.all(np.abs(private.noise) < 10 * private.share_std)


def test_privatized_update_is_clipped_noised_and_accounted(tmp_path: Path) -> None:
    # Prepare: the update's norm (about 2.4) is above the clip norm 0.1
    plan = make_plan(noise_multiplier=100.0, max_grad_norm=0.1, target_epsilon=10.0)

    # Execute
    private = privatize_update(
        GLOBAL,
        TRAINED,
        plan=plan,
        threshold=4,
        min_threshold=2,
        clipping_range=0.02,
        quantisation_bits=16,
        limits=LIMITS,
        ledger=open_ledger(tmp_path),
        server_round=1,
        run_id="run-1",
    )

    # Assert
    norm = np.sqrt(sum(float(np.sum(np.square(v))) for v in private.update.values()))
    assert {k: v.shape for k, v in private.update.items()} == {
        k: v.shape for k, v in GLOBAL.items()
    }
    assert private.norm_clipped and norm <= 0.1 + 1e-12
    assert private.clipped_values == 15  # every value of the scaled update exceeds 0.02
    assert max(float(np.abs(v).max()) for v in private.update.values()) <= 0.02
    assert private.delta == CLIENT_LEVEL_DELTA
    assert private.epsilon == planned_client_epsilon(
        noise_multiplier=100.0, rounds=1, delta=CLIENT_LEVEL_DELTA
    )


# ---------------------------------------------------------------- configuration


def test_client_dp_needs_a_study_id() -> None:
    with pytest.raises(ConfigError, match="'study-id' is required"):
        run_config(study_id="")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"secure_aggregation": False, "min_sites": 2}, "needs secure-aggregation = true"),
        ({"dp_accountant": "prv"}, "dp-accountant = 'rdp'"),
    ],
)
def test_client_dp_config_refusals(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_config(**changes)


def test_client_dp_accepts_a_derived_noise_multiplier() -> None:
    # Execute
    config = run_config(noise_multiplier=0.0)

    # Assert
    assert config.noise_multiplier == 0.0
    assert make_plan(noise_multiplier=0.0).derived
