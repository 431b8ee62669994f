"""How the native stack reads its settings (scripts/devstack/config.py); nothing is started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import config
from devstack.config import StackConfig
from devstack.procs import StackError

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.mark.parametrize("raw", ["eighty", "80 80", "-1", "65536"])
def test_a_port_that_is_no_port_is_refused_by_its_variable(raw: str) -> None:
    with pytest.raises(StackError, match=rf"MESH_PORT_REDIS must be a whole number from 0 to 65535, got '{raw}'"):
        StackConfig.from_env({"MESH_PORT_REDIS": raw})


@pytest.mark.parametrize("raw", ["three", "2.5", "-1"])
def test_a_count_of_instances_that_is_no_count_is_refused_by_its_variable(raw: str) -> None:
    with pytest.raises(StackError, match=rf"MESH_TODO_INSTANCES must be a whole number of 0 or more, got '{raw}'"):
        StackConfig.from_env({"MESH_TODO_INSTANCES": raw})


def test_ports_and_counts_that_are_numbers_are_taken() -> None:
    # Port 0 included: a test's Envoy binds what the kernel chose and reads it back.
    cfg = StackConfig.from_env({"MESH_PORT_REDIS": "16380", "MESH_PORT_ENVOY": "0", "MESH_TODO_INSTANCES": "3"})
    assert (cfg.ports.redis, cfg.ports.envoy, cfg.instances["todo"]) == (16380, 0, 3)
    # An empty variable is unset (task up's TODO= when not given).
    assert StackConfig.from_env({"MESH_TODO_INSTANCES": ""}).instances["todo"] == 1


def test_the_command_line_reports_a_bad_setting_in_one_line() -> None:
    # A traceback ending in the message would bury it; the CLI's own error
    # path says what to fix and exits 1.
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS), "MESH_PORT_REDIS": "six"}
    done = subprocess.run(
        [sys.executable, "-m", "devstack", "--profile", "test", "ps"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "error: MESH_PORT_REDIS must be a whole number from 0 to 65535, got 'six'"


def test_a_service_is_given_a_database_url_only_if_it_has_a_database(monkeypatch: pytest.MonkeyPatch) -> None:
    # One added without a database (docs/adding-a-service.md allows it) made
    # every start fail with a KeyError building its environment.
    monkeypatch.setattr(config, "SERVICES", (*config.SERVICES, "tag"))
    cfg = StackConfig.from_env({})
    assert "DATABASE_URL" not in cfg.service_env("tag")
    for service, database in config.DATABASES.items():
        assert cfg.service_env(service)["DATABASE_URL"].endswith(f"/{database}")
