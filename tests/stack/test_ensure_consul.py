"""scripts/ensure-consul: the native stack's Consul is the release compose.yml pins, whatever else is installed."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from devstack.config import ROOT

ENSURE_CONSUL = ROOT / "scripts" / "ensure-consul"
[PINNED] = re.findall(r'^CONSUL_VERSION="(v\S+)"$', ENSURE_CONSUL.read_text(), re.MULTILINE)


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(("release", "taken"), [(PINNED, True), ("v99.0.0", False), ("v1.0.0", False)])
def test_a_consul_on_path_is_taken_only_at_the_pinned_release(tmp_path: Path, release: str, taken: bool) -> None:
    # A newer one was taken too: the native stack then ran another Consul than
    # compose's, and the tests holding both to one release passed all the same.
    on_path = _executable(tmp_path / "bin" / "consul", f"#!/bin/sh\necho 'Consul {release}'\necho 'Revision 0'\n")
    cached = _executable(tmp_path / "cache" / "consul" / PINNED / "consul", "#!/bin/sh\n")
    env = {k: v for k, v in os.environ.items() if k != "CONSUL_BIN"}
    env |= {"PATH": f"{on_path.parent}:{env['PATH']}", "TODO_MESH_CACHE": str(tmp_path / "cache")}
    found = subprocess.run([str(ENSURE_CONSUL)], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert found.stdout == f"{on_path if taken else cached}\n"
    if not taken:
        assert f"ignoring {on_path}: Consul {release[1:]}, not the pinned Consul {PINNED}" in found.stderr
