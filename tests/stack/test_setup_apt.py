"""scripts/setup's apt_install: what it waits for, what it gives up on at once, and what it passes through sudo."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from devstack.config import ROOT

BROKEN_SOURCE = "E: The repository 'http://deb.example bookworm Release' does not have a Release file."
LOCKED = "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)"


def _bin(tmp_path: Path, apt_get: str | None) -> Path:
    """A PATH of its own: a non-root user, a sudo with env_reset, no sleeping, and ``apt_get`` (a sh body) if any."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("env", "seq", "true"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    fakes = {
        "id": "echo 1000",
        # env_reset: the command gets none of the caller's environment.
        "sudo": '[ "$1" = -n ] && shift\nexec env -i PATH="$PATH" "$@"',
        "sleep": f'echo "sleep $*" >>{tmp_path}/calls',
    }
    if apt_get is not None:
        fakes["apt-get"] = apt_get
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _apt_install(bin_dir: Path, *packages: str, **env: str) -> subprocess.CompletedProcess[str]:
    call = 'source "$1" && shift && apt_install "$@"'
    return subprocess.run(
        ["/bin/bash", "-c", call, "-", str(ROOT / "scripts" / "setup"), *packages],
        env={"PATH": str(bin_dir), **env},
        capture_output=True,
        text=True,
        # Bounded well below the old 30 tries 10 s apart, slept for real.
        timeout=60,
    )


def _calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_no_apt_get_is_said_at_once(tmp_path: Path) -> None:
    # Off Debian, each `env apt-get` failed, and was tried again 30 times, 10 s apart.
    done = _apt_install(_bin(tmp_path, apt_get=None), "postgresql", "jq")
    assert done.returncode == 1
    assert "setup: missing: postgresql jq, which setup installs from Debian's packages" in done.stderr
    assert "no apt-get" in done.stderr
    assert _calls(tmp_path) == []


def test_an_update_that_fails_for_good_stops_setup_with_apts_own_words(tmp_path: Path) -> None:
    apt_get = f'echo "apt-get $*" >>{tmp_path}/calls\necho "{BROKEN_SOURCE}" >&2\nexit 100'
    done = _apt_install(_bin(tmp_path, apt_get), "jq")
    assert done.returncode == 1
    assert BROKEN_SOURCE in done.stderr
    assert "setup: apt-get update failed (above)" in done.stderr
    assert len(_calls(tmp_path)) == 1  # neither tried again nor slept on


def test_the_lists_lock_is_waited_for_and_the_proxy_passes_through_sudo(tmp_path: Path) -> None:
    # Held once, as a new machine's apt-daily holds it; then free.
    apt_get = "\n".join(
        (
            f'echo "apt-get $* proxy=${{http_proxy:-}} no_proxy=${{no_proxy:-}}" >>{tmp_path}/calls',
            f'if [ "$3" = update ] && [ ! -e {tmp_path}/held ]; then',
            f"  : >{tmp_path}/held",
            f'  echo "{LOCKED}" >&2',
            "  exit 100",
            "fi",
        )
    )
    proxy = "http://proxy.example:3128"
    done = _apt_install(_bin(tmp_path, apt_get), "jq", http_proxy=proxy, no_proxy="127.0.0.1")
    assert done.returncode == 0, done.stderr
    assert "waiting for apt's lock" in done.stderr
    calls = _calls(tmp_path)
    assert [call.split()[3] for call in calls if call.startswith("apt-get")] == ["update", "update", "install"]
    assert "sleep 10" in calls
    assert all(f"proxy={proxy} no_proxy=127.0.0.1" in call for call in calls if call.startswith("apt-get"))
