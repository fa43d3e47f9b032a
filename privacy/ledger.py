"""A site's privacy ledger: what one study has spent at one site, kept on the site's own disk.

The ledger stores the accountant's full history (Opacus' ``(noise_multiplier, sample_rate,
num_steps)`` entries) and one entry per trained round (run id, round, steps, history added,
cumulative epsilon after, time). It is one JSON file, replaced atomically (temporary file,
fsync, ``os.replace``), so it survives node restarts and carries the budget from one run of a
study to the next.

Two levels of DP keep two separate ledgers, told apart by path and by schema so that one is
never read as the other: sample-level DP-SGD (``<root>/<study-id>/<site-id>.json``, one entry
per DP-SGD step) and client-level DP (``<root>/_client-level/<study-id>/<site-id>.json``, one
entry per round the site contributed; no study id starts with ``_``).

A ledger that cannot be read, does not match its schema, belongs to another study or site,
or whose history does not reproduce its recorded epsilons raises :class:`LedgerError`:
training stops rather than start again from zero. Never delete a ledger to "fix" it: that
resets the study's spent budget at this site; restore it from a backup instead.

A coordinator can always name a new study. So the site also keeps a site-wide index
(``<root>/_site-index/<site-id>.json``, replaced atomically like a ledger) of every ledger it
has ever written, with its round count, epsilon and digest, and charges every round against
its ``max-total-epsilon`` over all studies and both levels (:func:`site_spend`). A ledger the
index knows that is missing, has fewer rounds or less epsilon, or was rewritten is a
:class:`LedgerError`, never a fresh budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedrad.core.durable import write_atomic
from privacy.accounting import (
    ACCOUNTANTS,
    BudgetExhausted,
    HistoryEntry,
    LedgerError,
    PrivacyRefused,
    compute_epsilon,
    merge_history,
    validate_history_entry,
)
from privacy.checks import check_identifier
from privacy.dp import DPPlan, SiteLimits
from privacy.site_index import (
    LEVEL_DIRS,
    IndexEntry,
    index_path,
    ledger_files,
    ledger_path,
    read_index,
    write_index,
)

try:  # POSIX: serialise writers of one ledger; elsewhere the digest check still catches races
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CLIENT_LEVEL_SCHEMA",
    "LEDGER_LEVELS",
    "LEDGER_SCHEMA",
    "LEDGER_VERSION",
    "LedgerRound",
    "PrivacyLedger",
    "SiteSpend",
    "StudySpend",
    "site_spend",
]

LEDGER_SCHEMA = "fedrad-privacy-ledger"
"""Schema of a sample-level (DP-SGD) ledger."""
CLIENT_LEVEL_SCHEMA = "fedrad-client-level-ledger"
"""Schema of a client-level (distributed DP) ledger."""
LEDGER_LEVELS: dict[str, str] = {"sample": LEDGER_SCHEMA, "client": CLIENT_LEVEL_SCHEMA}
"""Ledger schema per DP level (the run config's ``dp`` mode)."""
LEDGER_VERSION = 1
_EPSILON_REL_TOL = 1e-6  # recorded vs recomputed epsilon; a tampered value is far off
_TOP_KEYS = {"schema", "version", "study_id", "site_id", "accountant", "delta", "history", "rounds"}
_ROUND_KEYS = {"run_id", "round", "steps", "history", "epsilon", "timestamp"}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LedgerRound:
    """One trained round as the ledger records it; ``epsilon`` is cumulative after it."""

    run_id: str
    server_round: int
    steps: int
    history: tuple[HistoryEntry, ...]
    epsilon: float
    timestamp: str


class PrivacyLedger:
    """The privacy spent by one study at one site; open it with :meth:`PrivacyLedger.open`."""

    def __init__(
        self,
        path: Path,
        *,
        study_id: str,
        site_id: str,
        delta: float | None,
        accountant: str | None,
        rounds: tuple[LedgerRound, ...],
        digest: str | None,
        level: str = "sample",
        root: Path | None = None,
    ):
        self._path = path
        self._root = root if root is not None else _root_of(path, level)
        self._level = level
        self._study_id = study_id
        self._site_id = site_id
        self._delta = delta
        self._accountant = accountant
        self._rounds = rounds
        self._digest = digest

    @classmethod
    def open(
        cls, root: Path, *, study_id: str, site_id: str, level: str = "sample"
    ) -> PrivacyLedger:
        """Open (or start, if there is none yet) the ledger of ``study_id`` at ``site_id``.

        Parameters
        ----------
        root : Path
            The site's ledger folder (node config ``ledger-dir``).
        study_id, site_id : str
            The key of the ledger.
        level : str
            ``sample`` (DP-SGD) or ``client`` (client-level DP): separate files and schemas.

        Raises
        ------
        LedgerError
            If the ledger file exists but cannot be trusted.
        """
        if level not in LEDGER_LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEDGER_LEVELS)}, got {level!r}.")
        check_identifier("study-id", study_id)
        check_identifier("site-id", site_id)
        path = ledger_path(Path(root), level=level, study_id=study_id, site_id=site_id)
        data = _read_bytes(path)
        if data is None:
            return cls(
                path,
                study_id=study_id,
                site_id=site_id,
                delta=None,
                accountant=None,
                rounds=(),
                digest=None,
                level=level,
                root=Path(root),
            )
        delta, accountant, rounds = _parse(
            data, path, study_id=study_id, site_id=site_id, schema=LEDGER_LEVELS[level]
        )
        return cls(
            path,
            study_id=study_id,
            site_id=site_id,
            delta=delta,
            accountant=accountant,
            rounds=rounds,
            digest=_digest(data),
            level=level,
            root=Path(root),
        )

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @property
    def level(self) -> str:
        """``sample`` or ``client``: the DP level this ledger accounts for."""
        return self._level

    @property
    def study_id(self) -> str:
        """The study this ledger accounts for."""
        return self._study_id

    @property
    def site_id(self) -> str:
        """The site this ledger belongs to."""
        return self._site_id

    @property
    def delta(self) -> float | None:
        """The delta the study is accounted at (fixed by its first round); None before."""
        return self._delta

    @property
    def accountant(self) -> str | None:
        """The accountant the study uses (fixed by its first round); None before."""
        return self._accountant

    @property
    def rounds(self) -> tuple[LedgerRound, ...]:
        """Every recorded round, oldest first."""
        return self._rounds

    @property
    def history(self) -> tuple[HistoryEntry, ...]:
        """The accountant's full history over all recorded rounds (merged, as Opacus keeps it)."""
        return merge_history(e for r in self._rounds for e in r.history)

    @property
    def spent_epsilon(self) -> float:
        """Cumulative epsilon recorded after the last round (0.0 before any)."""
        return self._rounds[-1].epsilon if self._rounds else 0.0

    def history_before(self, run_id: str) -> tuple[HistoryEntry, ...]:
        """History recorded before run ``run_id``'s first round (all of it for a new run)."""
        index = next((i for i, r in enumerate(self._rounds) if r.run_id == run_id), None)
        rounds = self._rounds if index is None else self._rounds[:index]
        return merge_history(e for r in rounds for e in r.history)

    def epsilon(self, *, delta: float, accountant: str) -> float:
        """Cumulative epsilon of the whole history at ``delta`` by ``accountant``."""
        return compute_epsilon(self.history, delta=delta, accountant=accountant)

    def check_budget(self, plan: DPPlan) -> float:
        """Refuse the next round unless it fits the study's target and the site's total.

        The site's total is the sum of every study's epsilon at this site (both levels) with
        this round's projection for this study, checked against ``plan.max_total_epsilon``
        (the site's ``max-total-epsilon``); see :meth:`check_site_budget`.

        Returns
        -------
        float
            The cumulative epsilon the study will have spent after the next round.

        Raises
        ------
        PrivacyRefused
            If the plan is for another study, delta or accountant than this ledger's.
        BudgetExhausted
            If the next round (its planned steps at its noise and sample rate) would bring
            the cumulative epsilon above ``plan.target_epsilon``, or the site's total above
            its ``max-total-epsilon``.
        LedgerError
            If a ledger the site index records is missing, rolled back or rewritten.
        """
        spent = self.spent_epsilon
        projected = self.projected_epsilon(
            plan.round_entry, study_id=plan.study_id, delta=plan.delta, accountant=plan.accountant
        )
        if projected > plan.target_epsilon:
            raise BudgetExhausted(
                f"Privacy budget of study '{self._study_id}' at site '{self._site_id}' is "
                f"exhausted: spent epsilon {spent:.4f} of target {plan.target_epsilon:g} "
                f"(delta {plan.delta:g}, {self._accountant or plan.accountant}); the next round "
                f"({plan.steps_per_round} steps at noise multiplier {plan.noise_multiplier:g}) "
                f"would reach {projected:.4f}. This site will not train this study further: "
                "stop the study here, or ask for a larger target-epsilon (at most this site's "
                "max-epsilon) or more noise. Spent budget is never reset.",
                spent=spent,
                target=plan.target_epsilon,
                projected=projected,
            )
        self._check_site_total(projected, max_total_epsilon=plan.max_total_epsilon)
        return projected

    def check_site_budget(self, *, projected: float, limits: SiteLimits) -> float:
        """Refuse a round of this study that the site's own limits over all studies forbid.

        Checks, in this order, that the study is in the site's ``allowed-studies`` (when it
        lists any) and that the site's total epsilon over all studies and both DP levels,
        with this study at ``projected`` (its cumulative epsilon after the round), stays
        within ``max-total-epsilon``. Totals use basic composition (:func:`site_spend`).

        Returns
        -------
        float
            The site's total epsilon after the round.

        Raises
        ------
        StudyNotAllowed
            If the study is not in a non-empty ``allowed-studies``.
        BudgetExhausted
            If the total would exceed ``max-total-epsilon``.
        LedgerError
            If a ledger the site index records is missing, rolled back or rewritten.
        """
        limits.check_study(self._study_id)
        return self._check_site_total(projected, max_total_epsilon=limits.max_total_epsilon)

    def _check_site_total(self, projected: float, *, max_total_epsilon: float) -> float:
        spend = site_spend(self._root, site_id=self._site_id)
        mine = (self._level, self._study_id)
        others = [s for s in spend.studies if (s.level, s.study_id) != mine]
        spent_elsewhere = math.fsum(s.epsilon for s in others)
        total = spent_elsewhere + projected
        if total > max_total_epsilon:
            raise BudgetExhausted(
                f"Site '{self._site_id}' has spent its privacy budget over all studies: "
                f"{len(others)} other study ledger(s) hold epsilon {spent_elsewhere:.4f} "
                f"together, and this round of study '{self._study_id}' ({self._level}-level) "
                f"would bring the total to {total:.4f}, above this site's max-total-epsilon "
                f"{max_total_epsilon:g} (basic composition: the sum of every study's epsilon). "
                "A new study-id does not start a fresh budget; only the site's operator can "
                "raise max-total-epsilon.",
                spent=spent_elsewhere + self.spent_epsilon,
                target=max_total_epsilon,
                projected=total,
            )
        return total

    def projected_epsilon(
        self, entry: HistoryEntry, *, study_id: str, delta: float, accountant: str
    ) -> float:
        """Cumulative epsilon after one more round that adds ``entry`` to the history.

        Raises
        ------
        PrivacyRefused
            If the study, delta or accountant differs from this ledger's.
        """
        self._check_compatible(study_id, delta, accountant)
        history = self.history + (validate_history_entry(entry),)
        return max(self.spent_epsilon, compute_epsilon(history, delta=delta, accountant=accountant))

    def record_round(
        self,
        *,
        server_round: int,
        run_id: str,
        history: Sequence[HistoryEntry],
        delta: float,
        accountant: str,
    ) -> float:
        """Add one trained round's accountant history and write the ledger atomically.

        Call it before anything trained in the round leaves the site.

        Returns
        -------
        float
            The study's cumulative epsilon at this site after the round.

        Raises
        ------
        LedgerError
            If the ledger changed on disk since it was opened or cannot be written (the
            ledger on disk and this object keep the previous state), or the site index
            cannot be brought up to date (the round is recorded; nothing may leave).
        """
        self._check_compatible(self._study_id, delta, accountant)
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
            raise ValueError(f"server_round must be a non-negative integer, got {server_round!r}.")
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}.")
        added = merge_history(history)
        if not added:
            raise ValueError("A round without any DP-SGD step has nothing to record.")
        computed = compute_epsilon(self.history + added, delta=delta, accountant=accountant)
        entry = LedgerRound(
            run_id=run_id,
            server_round=server_round,
            steps=sum(e[2] for e in added),
            history=added,
            epsilon=max(self.spent_epsilon, computed),  # both bound the full history's epsilon
            timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        rounds = self._rounds + (entry,)
        data = _serialise(
            LEDGER_LEVELS[self._level], self._study_id, self._site_id, delta, accountant, rounds
        )
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(self._path.parent / f".{self._path.name}.lock"):
            on_disk = _read_bytes(self._path)
            if (None if on_disk is None else _digest(on_disk)) != self._digest:
                raise LedgerError(
                    f"Ledger {self._path} changed on disk since it was opened (another process "
                    "trained this study?). Nothing was recorded; the round's result must not "
                    "leave the site. Re-open the ledger and retry the round."
                )
            try:
                _write_atomic(self._path, data)
            except OSError as err:
                raise LedgerError(
                    f"Could not write ledger {self._path}: {err}. The ledger keeps its previous "
                    "state; the round's result must not leave the site. Fix the disk and retry."
                ) from err
        self._rounds, self._delta, self._accountant = rounds, delta, accountant
        self._digest = _digest(data)
        _update_index(self._root, site_id=self._site_id)
        logger.info(
            "Study %s at site %s (%s-level): round %s spent %d steps, cumulative epsilon %.4f "
            "(delta %g)",
            self._study_id,
            self._site_id,
            self._level,
            server_round,
            entry.steps,
            entry.epsilon,
            delta,
        )
        return entry.epsilon

    def _check_compatible(self, study_id: str, delta: float, accountant: str) -> None:
        if study_id != self._study_id:
            raise PrivacyRefused(
                f"A plan for study '{study_id}' cannot spend the budget of study "
                f"'{self._study_id}'; open the ledger of study '{study_id}'."
            )
        if accountant not in ACCOUNTANTS:
            raise ValueError(
                f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}."
            )
        if self._delta is not None and delta != self._delta:
            raise PrivacyRefused(
                f"Study '{self._study_id}' is accounted at delta {self._delta:g} at site "
                f"'{self._site_id}', not {delta:g}; run with delta {self._delta:g} (or unset)."
            )
        if self._accountant is not None and accountant != self._accountant:
            raise PrivacyRefused(
                f"Study '{self._study_id}' is accounted with the {self._accountant} accountant at "
                f"site '{self._site_id}', not {accountant}; run with dp-accountant "
                f"{self._accountant}."
            )


@dataclass(frozen=True)
class StudySpend:
    """One study's cumulative epsilon at a site, at one DP level."""

    level: str
    study_id: str
    epsilon: float
    delta: float | None
    rounds: int


@dataclass(frozen=True)
class SiteSpend:
    """What a site has spent over all its studies (every ledger the index or the disk holds)."""

    site_id: str
    studies: tuple[StudySpend, ...]

    @property
    def total_epsilon(self) -> float:
        """Sum of every study's epsilon (basic composition)."""
        return math.fsum(s.epsilon for s in self.studies)

    @property
    def total_delta(self) -> float:
        """Sum of every study's delta (basic composition)."""
        return math.fsum(s.delta or 0.0 for s in self.studies)


def site_spend(root: Path, *, site_id: str) -> SiteSpend:
    """Add up what ``site_id`` has spent over all studies and both DP levels under ``root``.

    Studies may be accounted at different deltas and by different accountants, and each
    ledger's epsilon is already a bound for its own study; across studies the site uses
    basic (sequential) composition: the total is (sum of each study's epsilon, sum of each
    study's delta). Loose, but valid whatever the studies' deltas.

    Every ledger on disk counts, indexed or not (a crash between a ledger's write and the
    index's, or ledgers older than the index). Every ledger the index records must still be
    on disk with at least its recorded rounds and epsilon, and unchanged if it has no more
    rounds: deleting or rolling back a ledger does not free budget.

    Raises
    ------
    LedgerError
        If the index or a ledger cannot be trusted, or a ledger the index records is gone,
        rolled back or rewritten.
    """
    check_identifier("site-id", site_id)
    return SiteSpend(site_id, tuple(s for s, _ in _scan(Path(root), site_id).values()))


def _scan(root: Path, site_id: str) -> dict[tuple[str, str], tuple[StudySpend, str]]:
    indexed = read_index(root, site_id=site_id)
    on_disk = ledger_files(root, site_id=site_id)
    where = index_path(root, site_id=site_id)
    advice = (
        "Training stops at this site until the ledger is restored from a backup: deleting or "
        "rolling back a ledger does not free its budget."
    )
    found: dict[tuple[str, str], tuple[StudySpend, str]] = {}
    for key in sorted(set(indexed) | set(on_disk)):
        level, study = key
        entry = indexed.get(key)
        if key not in on_disk and entry is not None:
            raise LedgerError(
                f"The site index {where} records study '{study}' ({level}-level) at epsilon "
                f"{entry.epsilon:.4f} over {entry.rounds} round(s), but its ledger "
                f"{ledger_path(root, level=level, study_id=study, site_id=site_id)} is missing. "
                + advice
            )
        ledger = PrivacyLedger.open(root, study_id=study, site_id=site_id, level=level)
        digest = ledger._digest or ""
        if entry is not None:
            _check_against_index(ledger, entry, digest, where, advice)
        spend = StudySpend(level, study, ledger.spent_epsilon, ledger.delta, len(ledger.rounds))
        found[key] = (spend, digest)
    return found


def _check_against_index(
    ledger: PrivacyLedger, entry: IndexEntry, digest: str, where: Path, advice: str
) -> None:
    rounds = len(ledger.rounds)
    if rounds < entry.rounds or ledger.spent_epsilon < entry.epsilon:
        raise LedgerError(
            f"Ledger {ledger.path} holds {rounds} round(s) at epsilon "
            f"{ledger.spent_epsilon:.4f}, but the site index {where} recorded {entry.rounds} "
            f"round(s) at epsilon {entry.epsilon:.4f}: it was rolled back. " + advice
        )
    if rounds == entry.rounds and digest != entry.sha256:
        raise LedgerError(
            f"Ledger {ledger.path} differs from the copy the site index {where} recorded "
            "(same rounds, other contents): it was rewritten. " + advice
        )


def _update_index(root: Path, *, site_id: str) -> None:
    """Rewrite the site index from every ledger on disk (after checking them against it)."""
    path = index_path(root, site_id=site_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.parent / f".{path.name}.lock"):
        scanned = _scan(root, site_id)
        write_index(
            root,
            site_id=site_id,
            entries={
                key: IndexEntry(s.level, s.study_id, s.rounds, s.epsilon, s.delta, digest)
                for key, (s, digest) in scanned.items()
            },
        )


def _root_of(path: Path, level: str) -> Path:
    """The ledger root of a ledger file (``<root>[/<level dir>]/<study>/<site>.json``)."""
    return path.parent.parent.parent if LEVEL_DIRS[level] else path.parent.parent


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise LedgerError(f"Cannot read privacy ledger {path}: {err}.") from err


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then replace ``path``."""
    write_atomic(path, data)


def _serialise(
    schema: str,
    study_id: str,
    site_id: str,
    delta: float,
    accountant: str,
    rounds: tuple[LedgerRound, ...],
) -> bytes:
    record = {
        "schema": schema,
        "version": LEDGER_VERSION,
        "study_id": study_id,
        "site_id": site_id,
        "accountant": accountant,
        "delta": delta,
        "history": [list(e) for e in merge_history(e for r in rounds for e in r.history)],
        "rounds": [
            {
                "run_id": r.run_id,
                "round": r.server_round,
                "steps": r.steps,
                "history": [list(e) for e in r.history],
                "epsilon": r.epsilon,
                "timestamp": r.timestamp,
            }
            for r in rounds
        ],
    }
    return (json.dumps(record, indent=1, allow_nan=False) + "\n").encode("utf-8")


def _parse(
    data: bytes, path: Path, *, study_id: str, site_id: str, schema: str
) -> tuple[float | None, str | None, tuple[LedgerRound, ...]]:
    """Decode and verify a ledger file; raise LedgerError with the reason if it fails."""
    advice = (
        "Training of this study stops at this site. Restore the ledger from a backup; do not "
        "delete it (that would reset the spent budget)."
    )
    try:
        record = json.loads(data.decode("utf-8"))
        delta, accountant, rounds = _decode(
            record, study_id=study_id, site_id=site_id, schema=schema
        )
        _verify_epsilons(rounds, delta, accountant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise LedgerError(f"Privacy ledger {path} is not valid JSON ({err}). {advice}") from err
    except (ValueError, TypeError, KeyError) as err:
        raise LedgerError(f"Privacy ledger {path} is inconsistent: {err}. {advice}") from err
    return delta, accountant, rounds


def _decode(
    record: Any, *, study_id: str, site_id: str, schema: str
) -> tuple[float | None, str | None, tuple[LedgerRound, ...]]:
    if not isinstance(record, dict) or set(record) != _TOP_KEYS:
        raise ValueError(f"expected a JSON object with keys {sorted(_TOP_KEYS)}")
    if record["schema"] != schema or record["version"] != LEDGER_VERSION:
        raise ValueError(
            f"schema {record['schema']!r} version {record['version']!r} is not the expected "
            f"{schema!r} version {LEDGER_VERSION} (a ledger of the other DP level, or of "
            "another fedrad)"
        )
    if record["study_id"] != study_id or record["site_id"] != site_id:
        raise ValueError(
            f"it belongs to study {record['study_id']!r} at site {record['site_id']!r}, "
            f"not study {study_id!r} at site {site_id!r}"
        )
    if not isinstance(record["rounds"], list) or not isinstance(record["history"], list):
        raise ValueError("'rounds' and 'history' must be lists")
    rounds = tuple(_decode_round(i, raw) for i, raw in enumerate(record["rounds"]))
    delta, accountant = record["delta"], record["accountant"]
    if not rounds:
        if delta is not None or accountant is not None or record["history"]:
            raise ValueError("a ledger without rounds has no delta, accountant or history")
        return None, None, ()
    if isinstance(delta, bool) or not isinstance(delta, float) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}")
    history = tuple(tuple(e) if isinstance(e, list) else e for e in record["history"])
    if history != merge_history(e for r in rounds for e in r.history):
        raise ValueError("the accountant history differs from the rounds' histories")
    return delta, accountant, rounds


def _decode_round(index: int, raw: Any) -> LedgerRound:
    if not isinstance(raw, dict) or set(raw) != _ROUND_KEYS:
        raise ValueError(f"round entry {index} must have keys {sorted(_ROUND_KEYS)}")
    raw_history = raw["history"]
    if not isinstance(raw_history, list) or not raw_history:
        raise ValueError(f"round entry {index} has no history")
    if not all(isinstance(e, list) for e in raw_history):
        raise ValueError(f"round entry {index}: history entries must be lists")
    entries = tuple(validate_history_entry(e) for e in raw_history)
    steps, epsilon = raw["steps"], raw["epsilon"]
    if isinstance(steps, bool) or steps != sum(e[2] for e in entries):
        raise ValueError(f"round entry {index} records {steps!r} steps, its history has others")
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float):
        raise ValueError(f"round entry {index} has a non-numeric epsilon {epsilon!r}")
    if not (isinstance(raw["run_id"], str) and isinstance(raw["timestamp"], str)):
        raise ValueError(f"round entry {index} needs a string run_id and timestamp")
    server_round = raw["round"]
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise ValueError(f"round entry {index} has an invalid round number {server_round!r}")
    return LedgerRound(
        raw["run_id"], server_round, steps, entries, float(epsilon), raw["timestamp"]
    )


def _verify_epsilons(
    rounds: tuple[LedgerRound, ...], delta: float | None, accountant: str | None
) -> None:
    """Recompute recorded epsilons from the history (each RDP round; PRV's last, it is slow)."""
    if not rounds or delta is None or accountant is None:
        return
    previous = 0.0
    check = range(len(rounds)) if accountant == "rdp" else (len(rounds) - 1,)
    for index, entry in enumerate(rounds):
        if not (math.isfinite(entry.epsilon) and entry.epsilon >= previous):
            raise ValueError(
                f"round entry {index}: epsilon {entry.epsilon!r} decreases or is invalid"
            )
        if index in check:
            prefix = [e for r in rounds[: index + 1] for e in r.history]
            expected = max(previous, compute_epsilon(prefix, delta=delta, accountant=accountant))
            if not math.isclose(entry.epsilon, expected, rel_tol=_EPSILON_REL_TOL, abs_tol=1e-12):
                raise ValueError(
                    f"round entry {index} records epsilon {entry.epsilon!r} but its history "
                    f"gives {expected!r} ({accountant}, delta {delta:g})"
                )
        previous = entry.epsilon
