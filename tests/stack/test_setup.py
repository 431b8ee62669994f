"""scripts/setup's own promises."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from devstack.config import ROOT


def test_setup_refuses_a_python_older_than_3_11_before_it_does_anything(tmp_path: Path) -> None:
    # Every package asks for 3.11: an older one failed later, deep in pip's output.
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\necho 3.10\n")  # all that setup asks of it before it refuses
    old.chmod(0o755)
    # A copy, alone in a scratch tree: if the check ever stopped refusing, the
    # rest of setup would find nothing to install into, not the repo's .venv.
    setup = tmp_path / "tree" / "scripts" / "setup"
    setup.parent.mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "setup", setup)
    result = subprocess.run(
        [str(setup)],
        env={**os.environ, "PYTHON": str(old)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    assert f"setup: {old} is Python 3.10, and todo-mesh needs 3.11 or later" in result.stderr


def _units_started_on_install(systemd: Path, *packages: str) -> list[str]:
    """What setup stops and disables after installing ``packages``, systemd's runtime directory being ``systemd``."""
    call = 'source "$1" && shift && units_started_on_install "$@"'
    done = subprocess.run(
        ["bash", "-c", call, "-", str(ROOT / "scripts" / "setup"), str(systemd), *packages],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.split()


def test_setup_stops_the_daemons_that_the_packages_it_installs_start_where_systemd_runs(tmp_path: Path) -> None:
    # Debian's packages start their PostgreSQL, Redis and RabbitMQ on install,
    # on the stack's ports: the first `task up` stopped at "ports already in use".
    systemd = tmp_path / "run-systemd-system"
    systemd.mkdir()
    installed = ("postgresql", "curl", "redis-server", "jq", "rabbitmq-server")
    assert _units_started_on_install(systemd, *installed) == ["postgresql", "redis-server", "rabbitmq-server"]
    # One that was here before setup is not among those installed: left alone.
    assert _units_started_on_install(systemd, "curl", "redis-server") == ["redis-server"]
    # No systemd (a container's init), no daemon started on install.
    assert _units_started_on_install(tmp_path / "none", *installed) == []
