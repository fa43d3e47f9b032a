"""Which identity key and roster a site loads for secure aggregation, from its node config."""

from __future__ import annotations

import pytest

from client.site_identity import load_site_identity
from fedrad.core.config import NodeConfig
from fedrad.synth import SynthConfig, write_consortium
from fedrad.synth.identity import IDENTITY_FOLDER, ROSTER_FILE
from privacy.secagg import IdentityError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("sites")
    write_consortium(out, SynthConfig(sites=3, seed=3, image_size=16, samples_per_site=20))
    return out


@pytest.mark.parametrize("partition", [0, 2])
def test_a_simulated_site_finds_its_identity_by_partition(sites, partition):
    identity, roster = load_site_identity(
        NodeConfig(partition_id=partition, num_partitions=3), sites_dir=str(sites)
    )

    assert identity.name == f"site-{partition + 1}"
    assert list(roster) == ["site-1", "site-2", "site-3"]


def test_a_deployed_site_needs_the_ca_certificate(sites):
    folder = sites / IDENTITY_FOLDER
    node = NodeConfig(
        data_dir=str(sites / "site-1"),
        identity_key=str(folder / "site-1.key"),
        roster=str(folder / ROSTER_FILE),
    )

    with pytest.raises(IdentityError, match="ca-cert"):
        load_site_identity(node, sites_dir="")


def test_a_deployed_site_without_identity_says_how_to_make_one(sites):
    with pytest.raises(IdentityError, match="identity-key .*roster.*ca-cert"):
        load_site_identity(NodeConfig(data_dir=str(sites / "site-1")), sites_dir="")


def test_an_identity_key_without_a_roster_is_refused(sites):
    node = NodeConfig(partition_id=0, identity_key=str(sites / IDENTITY_FOLDER / "site-1.key"))

    with pytest.raises(IdentityError, match="both identity-key and roster"):
        load_site_identity(node, sites_dir=str(sites))
