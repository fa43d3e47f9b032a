"""Send messages over a Flower Grid and wait for the replies, polling briefly.

``Grid.send_and_receive`` in flwr 1.42 pulls replies every 0.1 s on the simulation engine and
every 3 s on the deployment engine. A secure-aggregation round makes four exchanges, three of
them light (keys, shares, unmasking), so that wait dominated a round. This does the same
through the Grid's public ``push_messages``/``pull_messages``, with a poll interval that starts
at a few milliseconds and backs off to :data:`MAX_POLL_S` while replies take longer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL_S = 0.005
MAX_POLL_S = 0.1
_BACKOFF = 1.5


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float) -> list[Message]:
    """Push ``messages``; return the replies that arrive within ``timeout`` seconds.

    Like ``Grid.send_and_receive``: a message the grid did not accept (no id back) is not waited
    for, and replies that have not arrived by the deadline are not returned.
    """
    pending = {str(i) for i in grid.push_messages(messages)}
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    interval = FIRST_POLL_S
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        time.sleep(min(interval, remaining))
        interval = min(interval * _BACKOFF, MAX_POLL_S)
    return replies
