"""scripts/setup's own promises."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
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


def _scratch_setup(tmp_path: Path) -> Path:
    """A copy of setup alone in a scratch tree: past the checks under test, it finds nothing to install into."""
    setup = tmp_path / "tree" / "scripts" / "setup"
    setup.parent.mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "setup", setup)
    return setup


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_a_working_venv_is_kept_whatever_python3_is_on_path(tmp_path: Path) -> None:
    # Made with PYTHON=python3.11 where python3 is 3.10: every later `task
    # test`, which runs setup with no PYTHON, stopped at python3's version.
    setup = _scratch_setup(tmp_path)
    _script(tmp_path / "bin" / "python3", "echo 3.10")
    venv_python = "\n".join(
        (
            'case "$*" in',
            '  "-m pip --version") exit 0 ;;',
            "  *version_info*) echo 3.11 ;;",
            '  *) echo "venv python asked: $*" >&2; exit 3 ;;',  # the stamp's question: setup got past the check
            "esac",
        )
    )
    _script(setup.parents[1] / ".venv" / "bin" / "python", venv_python)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    result = subprocess.run(
        [str(setup)],
        env={**env, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "is Python 3.10" not in result.stderr
    assert "venv python asked: -c import sys; print(sys.version)" in result.stderr
    assert (setup.parents[1] / ".venv" / "bin" / "python").exists()  # not taken for broken


def test_a_second_setup_waits_for_the_first_to_finish_with_the_venv(tmp_path: Path) -> None:
    # Two at once: one took the other's half-made venv for broken, and removed it.
    setup = _scratch_setup(tmp_path)
    asked = tmp_path / "asked"
    old = _script(tmp_path / "python3.10", f": >{asked}\necho 3.10")  # the first thing setup asks, after the lock
    stderr = tmp_path / "stderr"
    with (setup.parents[1] / ".venv.lock").open("w") as lock, stderr.open("w") as err:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first setup, at work
        second = subprocess.Popen([str(setup)], env={**os.environ, "PYTHON": str(old)}, stderr=err)
        try:
            deadline = time.monotonic() + 30
            while "waiting for another scripts/setup" not in stderr.read_text():
                assert second.poll() is None, stderr.read_text()
                assert time.monotonic() < deadline, "setup never said it waits"
                time.sleep(0.1)
            assert not asked.exists()
            fcntl.flock(lock, fcntl.LOCK_UN)
            assert second.wait(timeout=30) == 1
        finally:
            second.kill()
            second.wait()
    assert asked.exists()
    assert "is Python 3.10" in stderr.read_text()


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


def _asked_to_install(systemd: Path, *packages: str) -> str:
    """What setup, run by a user whose sudo asks for a password, tells them to run for ``packages``."""
    not_root = "id() { echo 1000; } && sudo() { return 1; }"
    call = f'source "$1" && SYSTEMD_RUNTIME=$2 && shift 2 && {not_root} && apt_install "$@"'
    done = subprocess.run(
        ["bash", "-c", call, "-", str(ROOT / "scripts" / "setup"), str(systemd), *packages],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    [line] = [line for line in done.stderr.splitlines() if "install them as root" in line]
    return line.partition("install them as root: ")[2]


def test_a_person_asked_to_install_the_packages_is_asked_to_stop_their_daemons_too(tmp_path: Path) -> None:
    # Left running, they stopped the first `task up` at "ports already in
    # use", and setup, run again with nothing missing, never stopped them.
    systemd = tmp_path / "run-systemd-system"
    systemd.mkdir()
    assert _asked_to_install(systemd, "postgresql", "redis-server", "jq") == (
        "sudo apt-get update && sudo apt-get install -y postgresql redis-server jq"
        " && sudo systemctl disable --now postgresql redis-server"
    )
    assert _asked_to_install(tmp_path / "none", "postgresql", "jq") == (
        "sudo apt-get update && sudo apt-get install -y postgresql jq"
    )
