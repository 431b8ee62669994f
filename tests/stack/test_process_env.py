"""A native service takes none of its settings from the developer's shell: compose's containers have none."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from devstack import mesh
from devstack.config import StackConfig
from devstack.procs import start

from .conftest import SLEEP


def environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if entry)


@pytest.mark.parametrize(
    ("service", "setting"),
    [
        ("notification", "RETRY_LIMIT"),
        ("notification", "SMTP_USERNAME"),
        ("user", "DB_POOL_SIZE"),
        ("todo", "CONSUL_CHECK_INTERVAL"),
        ("gateway", "RATE_LIMIT_PER_IP"),
    ],
)
def test_a_setting_exported_in_the_shell_does_not_reach_a_native_instance(
    cfg: StackConfig, monkeypatch: pytest.MonkeyPatch, service: str, setting: str
) -> None:
    # It changed the native instances only, unseen by the check that both
    # stacks give each service the same, and not by the fingerprint either:
    # a running instance kept the value it started with.
    monkeypatch.setenv(setting, "0")
    monkeypatch.setenv("MESH_KEPT", "1")  # anything else is inherited, as before
    proc = mesh.gateway(cfg, 0) if service == "gateway" else mesh.service(cfg, service, 0)
    # Its own process as the stack makes it, running a sleep rather than the service.
    seen = environ(start(cfg.run_dir, replace(proc, argv=[sys.executable, "-c", SLEEP])))
    assert setting not in seen
    assert seen["MESH_KEPT"] == "1" and seen["PATH"] == os.environ["PATH"] and seen["HOME"] == os.environ["HOME"]
    assert {name: seen[name] for name in proc.env} == dict(proc.env)
