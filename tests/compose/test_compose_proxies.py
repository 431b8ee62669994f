"""Consul's HTTP checks reach every instance on the compose network directly,
whatever proxies Docker hands the container.

Docker gives every container the proxies of the client's
~/.docker/config.json (``proxies``: httpProxy, httpsProxy, noProxy), under
both spellings of each name, unless the service sets that name itself.
Consul's checks follow HTTP_PROXY as Go does, which only loopback bypasses:
sent to a corporate proxy, the checks of every instance failed, and every
API call was 503 NO_HEALTHY_UPSTREAM. Go's own rules are asked, through
``proxycheck`` (a few lines of Go beside this file), not copied here.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from .conftest import APPS, compose_env, load_compose

PROXYCHECK_SRC = Path(__file__).resolve().parent / "proxycheck"
BUILD_TIMEOUT = 120  # seconds; it needs only Go's standard library

DOCKER_PROXY = "http://proxy.corp.example:3128"
# A developer's proxies as Docker injects them: every name in both spellings.
INJECTED = {
    spelling: value
    for name, value in {
        "HTTP_PROXY": DOCKER_PROXY,
        "HTTPS_PROXY": DOCKER_PROXY,
        "NO_PROXY": "localhost,.corp.example",
    }.items()
    for spelling in (name, name.lower())
}

ProxyOf = Callable[[Mapping[str, str], list[str]], dict[str, str]]


@pytest.fixture(scope="session")
def proxy_of(tmp_path_factory: pytest.TempPathFactory) -> ProxyOf:
    """``proxy_of(env, urls)``: the proxy Go sends each URL through in ``env``, or DIRECT."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("the Go toolchain (`go`) is required to ask Go's own proxy rules", pytrace=False)
    binary = tmp_path_factory.mktemp("proxycheck") / "proxycheck"
    env = {**os.environ, "CGO_ENABLED": "0", "GOPROXY": "off", "GOTOOLCHAIN": "local"}
    build = [go, "build", "-trimpath", "-buildvcs=false", "-o", str(binary), "."]
    built = subprocess.run(
        build, cwd=PROXYCHECK_SRC, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
    )
    assert built.returncode == 0, built.stderr

    def ask(env: Mapping[str, str], urls: list[str]) -> dict[str, str]:
        answered = subprocess.run(
            [str(binary)], input="\n".join(urls), env=dict(env), capture_output=True, text=True, timeout=30, check=True
        )
        return dict(line.split("\t") for line in answered.stdout.splitlines())

    return ask


def in_the_container(service: str) -> dict[str, str]:
    """The environment ``service``'s container gets: Docker's proxies, each replaced by the service's own."""
    return INJECTED | compose_env(service)


def checked_urls() -> list[str]:
    """Every URL Consul may check: each service's probes on every address of the compose network."""
    (ipam,) = load_compose()["networks"]["default"]["ipam"]["config"]
    subnet = ipaddress.ip_network(ipam["subnet"])
    # As mesh_common.consul registers them: the instance's own address and port.
    return [
        f"http://{address}:{app.port}/{path}?instance={app.name}-{address}-{app.port}"
        for address in subnet.hosts()
        for app in APPS
        for path in ("health/live", "health")
    ]


def test_consul_checks_every_instance_directly_whatever_proxy_docker_passes(proxy_of: ProxyOf) -> None:
    urls = checked_urls()
    answers = proxy_of(in_the_container("consul"), urls)
    assert len(answers) == len(urls)
    assert {url: proxy for url, proxy in answers.items() if proxy != "DIRECT"} == {}


def test_consul_still_has_the_proxy_for_anything_off_the_network(proxy_of: ProxyOf) -> None:
    # Else the test above could pass with no proxy at all, and prove nothing.
    outside = "http://checkpoint-api.hashicorp.com/"
    assert proxy_of(in_the_container("consul"), [outside]) == {outside: DOCKER_PROXY}
