"""The Flower side of the sent log: each reply's line, written before the reply leaves the site.

The two edges where replies leave, :func:`client.handlers._guarded` (train, evaluate) and
``client.secagg``'s stage handler (the four SecAgg+ stages), call :func:`record_reply` after
the allow-list check and before they return; a line that cannot be written refuses the reply
with an error reply, which :func:`record_refusal` logs in turn. An error reply holds only a
code and its fixed sentence, so it still goes out when even its own line cannot be written
(the failure is in the site's log, :data:`client.errors.SITE_LOGGER`).

The line's ``bytes`` is the size of the reply's content (or its error) as Flower serialises it
to protobuf (``flwr.common.serde.recorddict_to_proto(content).ByteSize()``, or
``error_to_proto(error).ByteSize()``), what travels besides the message's metadata; its
``sha256`` is that of :func:`client.sent_log.canonical_content` (or ``canonical_error``).
"""

from __future__ import annotations

import hashlib
import logging
import math

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.common.serde_utils import error_to_proto

from client.errors import SITE_LOGGER
from client.sent_log import (
    Records,
    SentReply,
    append_reply,
    canonical_content,
    canonical_error,
    sent_log_path,
    suppressed_statistics,
)
from client.site import Site, resolve_site
from fedrad.core import keys
from fedrad.core.config import NodeConfig, RunConfig
from fedrad.core.errors import ConfigError
from fedrad.core.fairness import FairnessLayout
from privacy import LedgerError, site_spend

__all__ = ["content_records", "record_refusal", "record_reply"]

log = logging.getLogger(SITE_LOGGER)

_TYPES: tuple[tuple[type, str], ...] = (
    (ArrayRecord, "array"),
    (MetricRecord, "metric"),
    (ConfigRecord, "config"),
)


def content_records(content: RecordDict) -> Records:
    """A reply's records as the plain values of :data:`client.sent_log.Records`."""
    records: dict[str, tuple[str, dict[str, object]]] = {}
    for name, record in content.items():
        kind = next(k for cls, k in _TYPES if isinstance(record, cls))
        if isinstance(record, ArrayRecord):
            records[name] = (kind, {k: a.numpy() for k, a in record.items()})
        else:
            records[name] = (kind, dict(record.items()))
    return records


def record_reply(
    reply: Message, *, request: Message, context: Context, site: Site | None = None
) -> None:
    """Append ``reply``'s line to the site's sent log.

    ``site`` is the site as the handler resolved it, or None to resolve it from the context.

    Raises
    ------
    SentLogError
        If the line cannot be written: the reply must not be sent.
    """
    site = site if site is not None else _site(context)
    config = request.content.config_records.get(keys.CONFIG) if request.has_content() else None
    study = str(_setting(config, context, "study-id", ""))
    if reply.has_error():
        error = reply.error
        records: Records = {}
        size = error_to_proto(error).ByteSize()
        digest = canonical_error(error.code, error.reason or "")
    else:
        records = content_records(reply.content)
        size = recorddict_to_proto(reply.content).ByteSize()
        digest = canonical_content(records)
    sent = SentReply(
        run_id=int(context.run_id),
        server_round=_round(config, request),
        kind="error" if reply.has_error() else request.metadata.message_type,
        message_type=request.metadata.message_type,
        study=study,
        size=size,
        sha256=hashlib.sha256(digest).hexdigest(),
        epsilon=_epsilon(records, study=study, site=site),
        suppressed=tuple(
            suppressed_statistics(
                records,
                dp=str(_setting(config, context, "dp", "off")),
                layout=_layout(config),
            )
        ),
        error_code=reply.error.code if reply.has_error() else None,
    )
    append_reply(sent_log_path(site.ledger_root, site_id=site.site_id), sent)


def record_refusal(
    reply: Message, *, request: Message, context: Context, site: Site | None = None
) -> Message:
    """Log the error reply ``reply`` in the sent log and return it, written or not."""
    try:
        record_reply(reply, request=request, context=context, site=site)
    except Exception as exc:  # noqa: BLE001 - a code and a fixed sentence may always leave
        log.error(
            "the error reply to %s (error %d) is sent without its line in the sent log: %s",
            request.metadata.message_type,
            reply.error.code,
            exc,
        )
    return reply


def _site(context: Context) -> Site:
    node = NodeConfig.from_user_config(context.node_config)
    return resolve_site(node, sites_dir=str(context.run_config.get("sites-dir", "")))


def _layout(config: ConfigRecord | None) -> FairnessLayout | None:
    """The fairness layout of the request's run config (None if it has none or is malformed)."""
    if config is None:
        return None
    try:
        return RunConfig.from_user_config(dict(config), strict=False).fairness_layout
    except (ConfigError, TypeError, ValueError):
        return None


def _setting(config: ConfigRecord | None, context: Context, key: str, default: object) -> object:
    """A run-config value as the request sent it, else as the node's run config holds it."""
    if config is not None and key in config:
        return config[key]
    return context.run_config.get(key, default)


def _round(config: ConfigRecord | None, request: Message) -> int | None:
    """The server round: the request's ``server-round``, else its group id (SecAgg+ stages)."""
    value = config.get(keys.SERVER_ROUND) if config is not None else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    group = request.metadata.group_id
    return int(group) if group.isdigit() else None


def _epsilon(records: Records, *, study: str, site: Site) -> float | None:
    """The study's epsilon after the reply: the reply's own, else the site's ledgers' total."""
    metrics = records.get(keys.METRICS)
    if metrics is not None and isinstance(metrics[1].get(keys.EPSILON), int | float):
        return float(metrics[1][keys.EPSILON])
    if not study or not site.ledger_root.is_dir():
        return None
    try:
        spend = site_spend(site.ledger_root, site_id=site.site_id)
    except (LedgerError, ConfigError) as exc:
        log.warning("the sent log records no epsilon: the ledgers cannot be read: %s", exc)
        return None
    spent = [s.epsilon for s in spend.studies if s.study_id == study]
    return math.fsum(spent) if spent else None
