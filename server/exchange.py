"""Send messages over a Flower Grid, wait for the replies, and sort them by site.

``Grid.send_and_receive`` in flwr 1.42 pulls replies every 0.1 s on the simulation engine and
every 3 s on the deployment engine. A secure-aggregation round makes four exchanges, three of
them light (keys, shares, unmasking), so that wait dominated a round. This does the same
through the Grid's public ``push_messages``/``pull_messages``, with a poll interval that starts
at a few milliseconds and backs off to :data:`MAX_POLL_S` while replies take longer (on the
deployment engine to :data:`DEPLOYED_MAX_POLL_S`: each pull is an HTTP request that the SuperLink
serves with the CPU the sites train on, and no reply comes sooner than a SuperNode's next poll).

:func:`collect_replies` then splits the replies of one exchange into per-site results and
failures, each failure filed under the node it was sent to.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # the simulation engine's grid

from fedrad.core import keys
from fedrad.core.errors import FedradError, error_text

__all__ = [
    "DEPLOYED_MAX_POLL_S",
    "FIRST_POLL_S",
    "MAX_POLL_S",
    "SiteReplies",
    "collect_replies",
    "describe_failures",
    "load_node_names",
    "node_label",
    "send_and_receive",
]

FIRST_POLL_S = 0.005
MAX_POLL_S = 0.1
DEPLOYED_MAX_POLL_S = 0.5
_BACKOFF = 1.5


def _max_poll(grid: Grid) -> float:
    return MAX_POLL_S if isinstance(grid, InMemoryGrid) else DEPLOYED_MAX_POLL_S


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float) -> list[Message]:
    """Push ``messages``; return the replies that arrive within ``timeout`` seconds.

    Like ``Grid.send_and_receive``: a message the grid did not accept (no id back) is not waited
    for, and replies that have not arrived by the deadline are not returned. Replies come back
    in the order their messages were sent, not in the order they arrived, so that aggregation
    (a floating-point sum) gives the same model for the same seed however the sites' timing falls.
    """
    pushed = [str(i) for i in grid.push_messages(messages)]
    order = {message_id: index for index, message_id in enumerate(pushed)}
    pending = set(pushed)
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    interval, max_poll = FIRST_POLL_S, _max_poll(grid)
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        time.sleep(min(interval, remaining))
        interval = min(interval * _BACKOFF, max_poll)
    return sorted(replies, key=lambda m: order.get(m.metadata.reply_to_message_id, len(order)))


@dataclass
class SiteReplies:
    """Replies of one exchange, split into per-site results and failures."""

    ok: list[Message] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    subgroups: dict[str, dict[str, int]] = field(default_factory=dict)
    secure: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    """Under SecAgg+: the securely summed evaluation totals of the model the round started from."""
    participants: list[str] = field(default_factory=list)
    """The sites whose reply is in the result: their names, or ``node-<id>`` under SecAgg+."""

    @property
    def num_trained(self) -> int:
        """Sites whose update is in the aggregate (under SecAgg+: those whose mask arrived)."""
        return int(self.secure["contributors"]) if self.secure else len(self.ok)


def collect_replies(
    sent: list[Message], replies: list[Message], names: dict[int, str]
) -> SiteReplies:
    """Split replies into results and failures, each failure under the node it was sent to.

    An error reply may come from the SuperLink itself (a node that vanished), so the node is
    found through the message replied to, never the reply's source. ``names`` maps node ids
    to the site names they reported earlier; it learns from this exchange.
    """
    out = SiteReplies()
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    answered: set[int] = set()
    for msg in replies:
        node = destination.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        answered.add(node)
        if msg.has_error():
            out.failures[node_label(node, names)] = error_text(
                int(msg.error.code), str(msg.error.reason)
            )
            continue
        site = str(msg.content[keys.SITE][keys.SITE_ID])
        names[node] = site
        metrics = next(iter(msg.content.metric_records.values()))
        out.results[site] = {k: (list(v) if isinstance(v, list) else v) for k, v in metrics.items()}
        if keys.SUBGROUPS in msg.content:
            out.subgroups[site] = _cell_counts(msg.content[keys.SUBGROUPS])
        out.participants.append(site)
        out.ok.append(msg)
    for node in set(destination.values()) - answered:
        out.failures[node_label(node, names)] = "no reply within round-timeout"
    return out


def node_label(node: int, names: Mapping[int, str] | None) -> str:
    """Return how a report names a node: its site name where known, else ``node-<id>``."""
    return f"{names[node]} (node {node})" if names and node in names else f"node-{node}"


def load_node_names(path: str) -> dict[int, str]:
    """Node id to site name, from the file ``fedrad coordinator start`` writes (``node-names``).

    The coordinator registered each site's key and knows which node is which hospital; the
    names only make its own reports readable. An empty ``path`` gives no names.
    """
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).expanduser().read_text())
        return {int(node): str(name) for node, name in dict(raw).items()}
    except FileNotFoundError:
        raise FedradError(
            f"node-names file {path} does not exist; `fedrad coordinator start` writes it when "
            "it registers the sites' keys, or leave node-names empty."
        ) from None
    except (ValueError, TypeError) as exc:
        raise FedradError(
            f"node-names file {path} is not a JSON object of node id to site name ({exc}); "
            "restart the coordinator with `fedrad coordinator start` to rewrite it."
        ) from None


def describe_failures(failures: Mapping[str, str]) -> str:
    """One line per distinct failure, naming every site it happened to (not N repeats)."""
    by_text: dict[str, list[str]] = {}
    for site, text in failures.items():
        by_text.setdefault(text, []).append(site)
    return "; ".join(f"{', '.join(sorted(sites))}: {text}" for text, sites in by_text.items())


def _cell_counts(record: Mapping[str, object]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for cell, value in record.items():
        if not isinstance(value, int | float | str | bytes):
            raise TypeError(f"subgroup cell {cell!r} holds {type(value).__name__}, not a count")
        counts[cell] = int(value)
    return counts
