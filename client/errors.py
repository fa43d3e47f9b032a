"""What a site says when it cannot answer: a stable code and its fixed sentence, nothing else.

Exception text names the site's paths, file names, label ids and values (a quarantined file
``images/DOE_JOHN_MRN4711_1961-02-03.dcm`` once reached a coordinator's ``metrics.jsonl``
through it). So a handler at the ClientApp's edge catches every exception, logs its full
detail here, at the site (Python logging, and the node config's ``log-file`` when set), and
replies with :func:`refusal`'s code and the sentence of ``fedrad.core.errors.ERROR_SENTENCES``
for it. Framework-free: the Flower adapters build the ``Error`` reply.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

from client.sent_log import SentLogError
from fedrad.core.errors import (
    ERROR_BUDGET,
    ERROR_DATA,
    ERROR_INPUT_RANGE,
    ERROR_INTERNAL,
    ERROR_LEDGER,
    ERROR_PEER_AUTH,
    ERROR_PRIVACY_LIMIT,
    ERROR_REQUEST,
    ERROR_REVEALING,
    ERROR_SECAGG,
    ERROR_SENTENCES,
    ERROR_STUDY_NOT_ALLOWED,
    ConfigError,
    DataError,
    FedradError,
)
from privacy import BudgetExhausted, LedgerError, PrivacyRefused, StudyNotAllowed
from privacy.secagg import InputError, PeerAuthenticationError, RequestRefused, SecAggError

__all__ = ["SITE_LOGGER", "error_code", "log_refusal", "refusal"]

SITE_LOGGER = "fedrad.site"
"""The logger every refusal's full detail goes to; it never leaves the site."""

# Most specific first: the first class an exception is an instance of gives its code.
_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (StudyNotAllowed, ERROR_STUDY_NOT_ALLOWED),
    (BudgetExhausted, ERROR_BUDGET),
    (PrivacyRefused, ERROR_PRIVACY_LIMIT),
    (LedgerError, ERROR_LEDGER),
    (PeerAuthenticationError, ERROR_PEER_AUTH),
    (RequestRefused, ERROR_REVEALING),
    (InputError, ERROR_INPUT_RANGE),
    (SecAggError, ERROR_SECAGG),
    (DataError, ERROR_DATA),
    (SentLogError, ERROR_INTERNAL),  # the site's own disk: nothing the request can change
    (ConfigError, ERROR_REQUEST),
    (FedradError, ERROR_REQUEST),
)

log = logging.getLogger(SITE_LOGGER)
_FILES: dict[Path, logging.Handler] = {}
_FILES_LOCK = threading.Lock()


def error_code(exc: BaseException) -> int:
    """The stable code of ``exc``: fedrad's and SecAgg+'s own classes, else internal (105)."""
    return next((code for cls, code in _CODES if isinstance(exc, cls)), ERROR_INTERNAL)


def refusal(exc: BaseException) -> tuple[int, str]:
    """The code and the fixed sentence a reply carries for ``exc`` (never its text)."""
    code = error_code(exc)
    return code, ERROR_SENTENCES[code]


def log_refusal(
    exc: BaseException, *, message_type: str, node_config: Mapping[str, object]
) -> tuple[int, str]:
    """Log ``exc`` in full at the site and return the code and sentence to reply with.

    Parameters
    ----------
    exc
        What the handler raised.
    message_type
        The Flower message type that failed (``train``, ``train.secagg_keys``, ...).
    node_config
        The node's raw node config; its ``log-file``, when set, receives the detail too. Read
        raw, not parsed: the failure may be a node config that does not parse.

    Returns
    -------
    tuple[int, str]
        The error code and its fixed sentence.
    """
    code, sentence = refusal(exc)
    _attach_log_file(str(node_config.get("log-file", "") or ""))
    fedrad_own = isinstance(exc, FedradError | SecAggError)
    log.error(
        "refusing %s (error %d, %s): %s",
        message_type,
        code,
        type(exc).__name__,
        exc,
        exc_info=None if fedrad_own else exc,  # a traceback for what fedrad did not expect
    )
    return code, sentence


def _attach_log_file(log_file: str) -> None:
    """Send the site logger to ``log_file`` as well (once per file and process)."""
    if not log_file:
        return
    path = Path(log_file).expanduser()
    with _FILES_LOCK:
        if path in _FILES:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as err:  # the reply must still go out; say so where it can be seen
            log.warning("cannot open the site's log-file %s: %s", path, err)
            return
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        _FILES[path] = handler
