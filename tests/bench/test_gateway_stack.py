"""The Envoy the gateway bench measures: the stack's own config, with its
shield's buckets raised out of a benchmark's reach, and still valid to Envoy.

On a host faster than the one the buckets were sized on, the stack's Envoy
refused most of the bench's requests with 429, and the bench stopped.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_stack import UNLIMITED, unthrottled_edge

from devstack import mesh
from devstack.config import StackConfig


def _buckets(node: Any) -> Iterator[dict[str, Any]]:
    """Every token bucket anywhere in a parsed config, wherever a filter keeps one."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "token_bucket":
                yield value
            else:
                yield from _buckets(value)
    elif isinstance(node, list):
        for item in node:
            yield from _buckets(item)


def _rendered(cfg: StackConfig, **edit: Any) -> tuple[list[str], dict[str, Any]]:
    proc = mesh.envoy(cfg, **edit)
    return list(proc.argv), yaml.safe_load((cfg.run_dir / "envoy.yaml").read_text())


def test_the_benchs_edge_is_the_stacks_with_buckets_no_benchmark_empties(tmp_path: Path) -> None:
    cfg = StackConfig.from_env({"MESH_RUN_DIR": str(tmp_path)}, profile="test")
    _, stacks = _rendered(cfg)
    argv, benchs = _rendered(cfg, edit=unthrottled_edge)

    raised = list(_buckets(benchs))
    # Both the ceiling for all clients and each client's own: a bucket left
    # as the stack has it would still throttle the bench on a fast host.
    assert len(raised) == len(list(_buckets(stacks))) == 2
    assert all(b["max_tokens"] == b["tokens_per_fill"] == UNLIMITED for b in raised)
    # Put back, they give the stack's config: nothing else was changed or
    # lost in the round trip through YAML.
    for bucket, stack_bucket in zip(raised, _buckets(stacks), strict=True):
        bucket.update(stack_bucket)
    assert benchs == stacks

    (cfg.run_dir / "logs").mkdir()  # start() makes it for a running stack
    config = str(cfg.run_dir / "envoy.yaml")
    envoy = argv[argv.index(config) - 2]  # [..., envoy, "-c", config, ...]
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", config],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
