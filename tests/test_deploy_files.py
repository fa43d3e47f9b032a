"""The files in deploy/ are what an operator uses: they parse and say what the code does."""

from __future__ import annotations

import configparser
import tomllib
from pathlib import Path

import pytest
import yaml

from fedrad.commands.consortium import FLOWER_ENV, read_site_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
pytestmark = pytest.mark.timeout(60)


def test_the_example_site_config_is_a_valid_site_config(tmp_path):
    folder = tmp_path / "hospital-a"
    folder.mkdir()
    (folder / "site.toml").write_text((DEPLOY / "site.example.toml").read_text())
    settings = read_site_settings(folder)
    assert settings.name == "hospital-a"
    assert settings.superlink == "coordinator.example.org:9092"
    assert settings.root_certificates == folder / "ca.pem"
    assert settings.node_config.min_cell_count == 10
    assert settings.node_config.identity_key == str(folder / "site.key")


def test_the_example_connection_names_a_tls_superlink():
    config = tomllib.loads((DEPLOY / "flwr-config.example.toml").read_text())
    connection = config["superlink"][config["superlink"]["default"]]
    assert connection["root-certificates"].endswith("ca.pem")
    assert "insecure" not in connection


@pytest.mark.parametrize("unit", ["fedrad-coordinator.service", "fedrad-site.service"])
def test_systemd_units_run_fedrad_with_telemetry_off(unit):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string((DEPLOY / "systemd" / unit).read_text())
    service = parser["Service"]
    assert service["ExecStart"].split()[0].endswith("/fedrad")
    assert service["ExecStart"].split()[1] in ("coordinator", "site")
    text = (DEPLOY / "systemd" / unit).read_text()
    for key, value in FLOWER_ENV.items():
        assert f"Environment={key}={value}" in text
    assert service["NoNewPrivileges"] == "true"


def test_the_image_turns_telemetry_and_runtime_installs_off():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for key, value in FLOWER_ENV.items():
        assert f"{key}={value}" in dockerfile
    assert 'ENTRYPOINT ["fedrad"]' in dockerfile


def test_compose_starts_a_coordinator_and_two_sites_with_tls():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    commands = {name: s["command"].split() for name, s in services.items()}
    assert commands["coordinator"][:2] == ["coordinator", "start"]
    sites = [name for name, c in commands.items() if c[:2] == ["site", "start"]]
    assert len(sites) == 2
    assert not any("--insecure-for-testing" in c for c in commands.values())
