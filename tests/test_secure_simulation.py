"""Secure aggregation on Flower's simulation engine: five synthetic sites, the real training.

A test ServerApp runs four rounds. Each round first sends plain ``train`` messages (the sites'
models in the clear, for reference), then runs ``secure_round`` on the same global
model and config; sites seed training with the round, so both train identical models. Rounds
1-2 have every site, in round 3 one site's ClientApp raises at the masking stage, in round 4
three of five do. Failures are injected by a mod of the test's own ClientApp wrapper, keyed by
the message's group (the round) and the node's partition.

The simulation runs in a child process (this file run as a script), as ``fedrad simulate``
does in test_end_to_end, so that Ray's workers die with its process group; the child writes
what it measured as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from privacy.secagg.wire import LOSS_RANGE

pytestmark = pytest.mark.timeout(400)

NUM_SITES = 5
THRESHOLD = 3
CLIPPING_RANGE = 0.5
QUANTISATION_BITS = 16
FAIL_AT = {3: (2,), 4: (0, 1, 2)}  # server round -> partitions whose ClientApp raises at masking
SITES_DIR = ""  # set in the child before the simulation starts; captured by the ClientApp


# ----------------------------------------------------------------------- the child process


def _client_app():
    from flwr.app import Context
    from flwr.clientapp import ClientApp

    import client.app as product
    from client.secagg import register
    from privacy.secagg.wire import MASK_ACTION

    sites_dir = SITES_DIR

    def test_wiring(msg, context, call_next):
        """Give the product ClientApp its sites folder; make planned sites fail at masking."""
        partition = int(context.node_config["partition-id"])
        action = msg.metadata.message_type.partition(".")[2]
        if action == MASK_ACTION and partition in FAIL_AT.get(int(msg.metadata.group_id), ()):
            raise RuntimeError(f"test: partition {partition} fails at {action}")
        # Flower refuses a Context whose run config changed: hand the app a copy that shares
        # the node's state.
        wired = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=context.node_config,
            state=context.state,
            run_config={**context.run_config, "sites-dir": sites_dir},
        )
        return call_next(msg, wired)

    app = ClientApp(mods=[test_wiring])
    app.train()(product.train)
    register(app, product._secure_input, product._evaluation_counts, product._min_threshold)
    return app


def _site_config(config, spec, server_round):
    from flwr.app import ConfigRecord

    from fedrad.core import keys

    values = {
        k: v
        for k, v in config.to_user_config().items()
        if k not in ("sites-dir", "out-dir", "resume-from")
    }
    values.update({keys.MODEL_SPEC: json.dumps(spec.to_dict()), keys.SERVER_ROUND: server_round})
    return ConfigRecord(values)


def _plain_round(grid, nodes, arrays, site_config, server_round):
    """Plain train messages to every node: each site's model, weight and loss sum."""
    from flwr.app import Message, RecordDict

    from fedrad.core import keys
    from server.strategies import numpy_to_arrays

    content = RecordDict({keys.ARRAYS: numpy_to_arrays(arrays.items()), keys.CONFIG: site_config})
    messages = [
        Message(content=content, message_type="train", dst_node_id=n, group_id=str(server_round))
        for n in nodes
    ]
    sites = {}
    for reply in grid.send_and_receive(messages, timeout=120):
        assert not reply.has_error(), reply.error
        metrics = reply.content[keys.METRICS]
        sites[reply.metadata.src_node_id] = {
            "site": str(reply.content[keys.SITE][keys.SITE_ID]),
            "arrays": {k: v.numpy() for k, v in reply.content[keys.ARRAYS].items()},
            "weight": int(metrics[keys.NUM_EXAMPLES]),
            "loss-sum": float(metrics[keys.LOSS_SUM]),
        }
    return sites


def _compare(result, sites, arrays):
    """How far the secure aggregate is from plain FedAvg of the sites it says it summed."""
    kept = [s for node, s in sites.items() if f"node-{node}" not in result.dropped]
    weights = np.array([s["weight"] for s in kept], dtype=np.float64)
    excess, largest = -np.inf, 0.0
    for name in arrays:
        models = np.stack([s["arrays"][name].astype(np.float64) for s in kept])
        expected = np.tensordot(weights, models, axes=1) / weights.sum()
        error = np.abs(result.arrays[name].astype(np.float64) - expected)
        float32_rounding = np.finfo(np.float32).eps * np.abs(expected)
        excess = max(excess, float((error - result.error_bound - float32_rounding).max()))
        largest = max(largest, float(error.max()))
    return {
        "max-error": largest,
        "max-excess-over-bound": excess,
        "num-examples": [result.totals["num-examples"], float(weights.sum())],
        "loss-sum": [result.totals["loss-sum"], sum(s["loss-sum"] for s in kept)],
        "max-update": max(
            float(np.abs(s["arrays"][n] - arrays[n]).max()) for s in kept for n in arrays
        ),
    }


def _server_app(out: Path):
    from flwr.serverapp import ServerApp

    from fedrad.core.config import RunConfig
    from server.initial_model import initial_arrays, model_spec
    from server.secagg import secure_round

    app = ServerApp()

    @app.main()
    def main(grid, context):
        config = RunConfig(image_size=32, batch_size=8, local_epochs=1, min_sites=2)
        spec = model_spec(config)
        arrays = initial_arrays(spec, config.seed)
        while len(nodes := sorted(grid.get_node_ids())) < NUM_SITES:
            time.sleep(0.2)
        report = []
        for server_round in (1, 2, 3, 4):
            site_config = _site_config(config, spec, server_round)
            started = time.monotonic()
            sites = _plain_round(grid, nodes, arrays, site_config, server_round)
            plain_seconds = time.monotonic() - started
            result = secure_round(
                grid,
                nodes,
                server_round=server_round,
                arrays=arrays,
                site_config=site_config,
                threshold=THRESHOLD,
                clipping_range=CLIPPING_RANGE,
                timeout=120,
                quantisation_bits=QUANTISATION_BITS,
            )
            name = {f"node-{node}": s["site"] for node, s in sites.items()}
            record = {
                "round": server_round,
                "status": result.status,
                "reason": result.reason,
                "contributors": result.contributors,
                "dropped": sorted(name[n] for n in result.dropped),
                "failures": {name[n]: why for n, why in result.failures.items()},
                "error-bound": result.error_bound,
                "seconds": {"plain": plain_seconds, **result.seconds},
            }
            if result.arrays is not None:
                record.update(_compare(result, sites, arrays))
                arrays = result.arrays
            report.append(record)
        out.write_text(json.dumps(report, indent=1))

    return app


def _main(sites_dir: str, out: str) -> None:
    import os

    from flwr.simulation import run_simulation

    global SITES_DIR
    SITES_DIR = sites_dir
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.basicConfig(level=logging.INFO)
    run_simulation(
        server_app=_server_app(Path(out)),
        client_app=_client_app(),
        num_supernodes=NUM_SITES,
        backend_config={
            "client_resources": {"num_cpus": 1},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )


# -------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from helpers import run_command

    from fedrad.synth import SynthConfig, write_consortium

    sites = tmp_path_factory.mktemp("secure-sites")
    write_consortium(
        sites,
        SynthConfig(sites=NUM_SITES, seed=11, kind="2d", image_size=32, samples_per_site=20),
        overwrite=True,
    )
    out = tmp_path_factory.mktemp("secure-run") / "report.json"
    # -P: the script's folder (tests/, with its own models/) must not shadow the packages
    result = run_command([sys.executable, "-P", __file__, str(sites), str(out)], timeout=360)
    assert result.returncode == 0 and out.is_file(), result.stdout[-6000:]
    print(out.read_text())
    return {r["round"]: r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("server_round", [1, 2])
def test_secure_round_equals_fedavg_of_every_site(report, server_round):
    record = report[server_round]

    assert (record["status"], record["contributors"], record["dropped"]) == (
        "completed",
        NUM_SITES,
        [],
    )
    assert record["max-update"] <= CLIPPING_RANGE
    assert record["max-error"] > 0  # it did go through quantisation
    assert record["max-excess-over-bound"] <= 0
    assert record["num-examples"][0] == record["num-examples"][1]
    secure_loss, plain_loss = record["loss-sum"]
    loss_bound = record["num-examples"][1] * LOSS_RANGE / (2**QUANTISATION_BITS - 1)
    assert abs(secure_loss - plain_loss) <= loss_bound


def test_a_site_raising_at_masking_leaves_the_exact_aggregate_of_the_others(report):
    record = report[3]

    assert (record["status"], record["contributors"]) == ("completed", NUM_SITES - 1)
    assert record["dropped"] == ["site-3"]
    assert "fails at secagg_mask" in record["failures"]["site-3"]
    assert record["max-excess-over-bound"] <= 0
    assert record["num-examples"][0] == record["num-examples"][1]
    assert record["seconds"]["total"] < 60


def test_three_of_five_dropping_abort_the_round(report):
    record = report[4]

    assert record["status"] == "aborted" and "too few masked inputs" in record["reason"]
    assert record["contributors"] == 0
    assert len(record["failures"]) == 3


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
