"""The small exception tree shared by every fedrad component.

Every message says what is wrong and how to fix it. A failure while handling one Flower
message becomes an error reply, never a crash of the node.
"""

from __future__ import annotations


class FedradError(Exception):
    """Base class of every error fedrad raises on purpose."""


class ConfigError(FedradError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class DataError(FedradError):
    """A site's data folder cannot be used (missing folder, bad labels, no usable samples)."""


class RunDirError(FedradError):
    """A run directory is missing, incomplete or of an unknown schema version."""


ERROR_DATA = 100
ERROR_SECAGG = 101
ERROR_REVEALING = 102
ERROR_BUDGET = 103
ERROR_REQUEST = 104
ERROR_INTERNAL = 105
ERROR_PRIVACY_LIMIT = 106
ERROR_STUDY_NOT_ALLOWED = 107
ERROR_LEDGER = 108
ERROR_INPUT_RANGE = 109
ERROR_PEER_AUTH = 110

ERROR_SENTENCES: dict[int, str] = {
    ERROR_DATA: (
        "the site could not use its data for this request; its operator finds the cause in "
        "the site's log"
    ),
    ERROR_SECAGG: (
        "the site could not take this secure-aggregation step (a message it could not accept, "
        "or no round in progress); the round goes on without it; see the site's log"
    ),
    ERROR_REVEALING: (
        "the site refused: answering could reveal its input (check the round's participant "
        "and dropped lists); see the site's log"
    ),
    ERROR_BUDGET: (
        "the site refused: its privacy budget for this study, or over all its studies, is "
        "spent; see the site's log"
    ),
    ERROR_REQUEST: (
        "the site could not serve the request as sent (a missing or invalid value in it); "
        "check the run config; see the site's log"
    ),
    ERROR_INTERNAL: (
        "the site failed on this request with an unexpected error; its operator finds the "
        "details in the site's log"
    ),
    ERROR_PRIVACY_LIMIT: (
        "the site refused: the request asks for more privacy loss than the site allows "
        "(epsilon, delta or DP mode); see the site's log"
    ),
    ERROR_STUDY_NOT_ALLOWED: (
        "the site refused: this study is not in its allowed-studies; ask the site's operator"
    ),
    ERROR_LEDGER: (
        "the site stopped: its privacy ledger cannot be trusted or written; its operator must "
        "restore it (see the site's log)"
    ),
    ERROR_INPUT_RANGE: (
        "the site's update does not fit the round's ranges (clipping range or weight); see "
        "the site's log"
    ),
    ERROR_PEER_AUTH: (
        "the site aborted the secure round: a peer's round keys failed authentication against "
        "its roster (bad signature, unknown peer or roster mismatch); see the site's log"
    ),
}
"""The stable error codes a site replies with, each with the only sentence that travels.

A site never sends an exception's text: it names paths, labels or values of the site. The
code and its fixed sentence say what kind of failure happened and who can act; the detail
stays in the site's own log. Flower uses codes 0 to 3 for its own errors.
"""


def error_text(code: int, reason: str) -> str:
    """How a coordinator reports an error reply: ``error <code>: <sentence>``.

    A known code is shown with its own fixed sentence, whatever text the reply carried, so
    nothing but the table's words from a site reaches a report; Flower's own codes (and
    unknown ones) keep their reason.
    """
    return f"error {code}: {ERROR_SENTENCES.get(code, reason)}"
