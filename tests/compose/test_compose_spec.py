"""compose.yml through ``scripts/compose-check``, the compose-spec loader and
schema validation ``docker compose`` itself uses, and proof that the checker
rejects broken copies."""

from __future__ import annotations

import copy
import hashlib
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import COMPOSE_FILE, EXPECTED_SERVICES, REPO, load_compose

CHECKER_SRC = REPO / "scripts" / "compose-check"
# Everything that determines the checker binary; their hash names the cached
# binary so an edit (or a compose-go bump in go.mod/go.sum) forces a rebuild.
CHECKER_INPUTS = ("go.mod", "go.sum", "main.go")
CHECKER_BUILD_TIMEOUT = 300  # seconds; a cold build compiles compose-go
CACHE_PRUNE_AGE = 14 * 24 * 3600  # drop binaries of old revisions after 2 weeks


# ---------------------------------------------------------------------------
# the checker binary
# ---------------------------------------------------------------------------


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "todo-mesh" / "compose-check"


def _prune_stale(cache: Path, keep: Path) -> None:
    cutoff = time.time() - CACHE_PRUNE_AGE
    for old in cache.glob("compose-check-*"):
        if old == keep:
            continue
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass  # another session may be pruning too


@pytest.fixture(scope="session")
def compose_check() -> Path:
    """Path to the compose-check binary, built once per source revision."""
    go = shutil.which("go")
    if go is None:
        pytest.fail(
            "the Go toolchain (`go`, >= 1.24) is required to build scripts/compose-check, "
            "which validates compose.yml against the compose-spec schema; install Go and "
            "make sure `go` is on PATH. This test is never skipped.",
            pytrace=False,
        )

    digest = hashlib.sha256()
    for name in CHECKER_INPUTS:
        digest.update(name.encode() + b"\0" + (CHECKER_SRC / name).read_bytes() + b"\0")
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / f"compose-check-{digest.hexdigest()[:16]}"

    if os.access(binary, os.X_OK):
        os.utime(binary)  # mark as in use, see _prune_stale
        return binary

    # Build to a private name, then rename: concurrent sessions never see a
    # half-written binary.
    tmp = cache / f".{binary.name}.{os.getpid()}.tmp"
    # Offline: `task setup` fetched the modules. A test reaches nothing beyond loopback.
    env = {**os.environ, "CGO_ENABLED": "0", "GOPROXY": "off"}
    cmd = [go, "build", "-mod=readonly", "-trimpath", "-buildvcs=false", "-o", str(tmp), "."]
    try:
        proc = subprocess.run(
            cmd,
            cwd=CHECKER_SRC,
            env=env,
            capture_output=True,
            text=True,
            timeout=CHECKER_BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        pytest.fail(f"`{shlex.join(cmd)}` timed out after {CHECKER_BUILD_TIMEOUT}s", pytrace=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        pytest.fail(
            f"building scripts/compose-check failed ({shlex.join(cmd)}; its modules come from `task setup`):\n"
            f"{proc.stdout}{proc.stderr}",
            pytrace=False,
        )
    os.replace(tmp, binary)
    _prune_stale(cache, binary)
    return binary


# What `task up` sets; compose.yml has no default for it.
SECRET = ("-env", "NOTIFICATION_CLIENT_SECRET=a-secret-of-sixteen-or-more")


def run_checker(
    binary: Path, compose_file: Path, env_args: tuple[str, ...] = SECRET
) -> subprocess.CompletedProcess[str]:
    # -strict: loader warnings (obsolete `version:`, unset variables) fail too.
    # -project-directory: relative paths resolve against the repo even for
    # copies written to a temporary directory.
    return subprocess.run(
        [str(binary), "-strict", "-project-directory", str(REPO), *env_args, str(compose_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ---------------------------------------------------------------------------
# compose-spec validation (compose-go)
# ---------------------------------------------------------------------------


# The first test to request compose_check pays for a cold build (module
# download + compile): allow more than the project-wide per-test timeout.
@pytest.mark.timeout(CHECKER_BUILD_TIMEOUT + 60)
def test_compose_file_is_valid(compose_check: Path) -> None:
    proc = run_checker(compose_check, COMPOSE_FILE)
    assert proc.returncode == 0, f"compose.yml rejected:\n{proc.stderr}"
    assert proc.stderr == ""
    assert set(proc.stdout.split()) == EXPECTED_SERVICES


@pytest.mark.timeout(CHECKER_BUILD_TIMEOUT + 60)
def test_compose_has_no_default_client_secret(compose_check: Path) -> None:
    # A public default was accepted by the user-service wherever the file ran.
    proc = run_checker(compose_check, COMPOSE_FILE, env_args=())
    assert proc.returncode == 1
    assert "NOTIFICATION_CLIENT_SECRET" in proc.stderr and "task up" in proc.stderr


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        node[leaf] = value

    return mutate


# (mutation, text the checker's error must contain). The first case is the
# control: the same YAML round-trip without a change must still pass, so the
# other cases fail for the reason they name and not because of the copy.
MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None] | None, str]] = {
    "unchanged-copy": (None, ""),
    "unknown-key": (_set("services.redis.healthcheck.intervall", "5s"), "intervall"),
    "unknown-top-level-key": (_set("servics", {}), "servics"),
    "bad-depends-on-condition": (
        _set("services.envoy.depends_on.gateway.condition", "service_ready"),
        "condition",
    ),
    "undefined-dependency": (
        _set("services.gateway.depends_on.cache", {"condition": "service_healthy"}),
        'undefined service "cache"',
    ),
    "undefined-named-volume": (_set("services.redis.volumes", ["redisdata:/data"]), "undefined volume"),
    "wrong-type": (_set("services.redis.healthcheck.retries", "many"), "retries"),
    "obsolete-version-key": (_set("version", "3.9"), "warning"),
}


@pytest.mark.timeout(CHECKER_BUILD_TIMEOUT + 60)
@pytest.mark.parametrize("case", list(MUTATIONS))
def test_checker_rejects_invalid_copies(compose_check: Path, tmp_path: Path, case: str) -> None:
    mutate, expected = MUTATIONS[case]
    doc = copy.deepcopy(load_compose())
    if mutate is not None:
        mutate(doc)
    broken = tmp_path / "compose.yml"
    broken.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")

    proc = run_checker(compose_check, broken)
    if mutate is None:
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 1, f"checker accepted the {case} copy:\n{proc.stdout}{proc.stderr}"
    assert expected in proc.stderr
