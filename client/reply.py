"""The one place that decides what a site's reply may contain.

Every outgoing RecordDict is checked against an allow-list of record and metric keys before it
leaves the site: model weights, additive metric sums and the site's own name. Anything else
(pixels, identifiers, attribute values) is refused here, whatever a handler tried to send.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.disclosure import is_allowed_cell
from fedrad.core import keys
from fedrad.core.errors import FedradError
from privacy.secagg import ProtocolError
from privacy.secagg.allowlist import check_reply_fields


class ReplyNotAllowed(FedradError):
    """A reply held something that may not leave the site."""


ALLOWED_RECORDS: dict[str, type] = {
    keys.ARRAYS: ArrayRecord,
    keys.METRICS: MetricRecord,
    keys.SITE: ConfigRecord,
    keys.SUBGROUPS: ConfigRecord,
    keys.SECAGG: ConfigRecord,
}


def check_reply(content: RecordDict, *, min_cell_count: int | None = None) -> None:
    """Raise ReplyNotAllowed unless every record and key of ``content`` is allowed.

    Subgroup cells must name a known attribute and value and count at least
    ``min_cell_count`` patients.
    """
    for name, record in content.items():
        expected = ALLOWED_RECORDS.get(name)
        if expected is None or not isinstance(record, expected):
            raise ReplyNotAllowed(
                f"record '{name}' ({type(record).__name__}) may not leave the site"
            )
        if name == keys.SECAGG:
            if len(content) != 1:
                raise ReplyNotAllowed(f"record '{name}' travels alone")
            try:
                check_reply_fields(dict(record))
            except ProtocolError as exc:
                raise ReplyNotAllowed(f"record '{name}' may not leave the site: {exc}") from exc
            continue
        if name == keys.SUBGROUPS:
            if min_cell_count is None:
                raise ReplyNotAllowed("subgroup counts need the site's min-cell-count")
            bad = [
                k
                for k, v in record.items()
                if not is_allowed_cell(k, v, min_cell_count=min_cell_count)
            ]
            if bad:
                raise ReplyNotAllowed(
                    f"subgroup cell(s) {sorted(bad)[:3]} are unknown or below the site's "
                    f"min-cell-count of {min_cell_count}"
                )
            continue
        if isinstance(record, MetricRecord):
            extra = set(record) - keys.ALLOWED_REPLY_METRICS
            if extra:
                raise ReplyNotAllowed(f"metric(s) {sorted(extra)} may not leave the site")
        if isinstance(record, ConfigRecord):
            extra = set(record) - keys.ALLOWED_REPLY_CONFIG
            if extra:
                raise ReplyNotAllowed(f"config key(s) {sorted(extra)} may not leave the site")
