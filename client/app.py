"""The site's Flower ClientApp (``client.app:app``): a thin forwarder to the site's warm worker.

On the deployment engine Flower starts a fresh ClientApp process for every message, so this
module imports only flwr and the stdlib: each message is handed to the site's warm worker
(:mod:`client.worker`), which keeps torch, the dataset and the models loaded and runs the
handlers of :mod:`client.handlers`. In simulation (a node config without ``data-dir``), with
``warm-worker=false`` in the node config, or with a node config that does not parse (whose error
reply the handlers write), the handlers run in this process, as before.

The handlers' names (``train``, ``evaluate``, ...) are also reachable here, loaded on first use.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

log = logging.getLogger(__name__)


def _use_worker(context: Context) -> bool:
    """Whether this message goes to the warm worker: deployed, switched on, config valid."""
    from fedrad.core.config import NodeConfig  # stdlib only, and not needed in simulation

    try:
        node = NodeConfig.from_user_config(context.node_config)
    except Exception:  # noqa: BLE001 - the handlers answer it with an error reply
        return False
    return bool(node.data_dir) and node.warm_worker


class SiteClientApp(ClientApp):
    """A ClientApp that runs every message in the site's warm worker when deployed."""

    def __call__(self, message: Message, context: Context) -> Message:
        """Forward ``message`` to the warm worker, or run the handlers in-process."""
        if not _use_worker(context):
            site_app: ClientApp = importlib.import_module("client.handlers").app
            return site_app(message, context)
        from client.worker import WorkerError, forward

        try:
            return forward(message, context)
        except (WorkerError, OSError) as exc:
            from fedrad.core.errors import ERROR_INTERNAL, ERROR_SENTENCES

            log.error("the site's warm worker failed on %s: %s", message.metadata.message_type, exc)
            return Message(
                Error(code=ERROR_INTERNAL, reason=ERROR_SENTENCES[ERROR_INTERNAL]), reply_to=message
            )


app = SiteClientApp()


def __getattr__(name: str) -> Any:
    # the handlers' names for in-process callers (tests, tools), imported on first use
    handlers = importlib.import_module("client.handlers")
    if name.startswith("__") or not hasattr(handlers, name):
        raise AttributeError(f"module 'client.app' has no attribute {name!r}")
    return getattr(handlers, name)
