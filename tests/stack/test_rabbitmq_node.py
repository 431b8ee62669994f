"""The native broker's Erlang node name: one per run directory, so that two clones' stacks can share an epmd."""

from __future__ import annotations

from pathlib import Path

from devstack import rabbitmq
from devstack.config import StackConfig


def _node(run_root: Path, profile: str = "dev") -> str:
    cfg = StackConfig.from_env({"MESH_RUN_DIR": str(run_root)}, profile=profile)
    name = rabbitmq._env(cfg)["RABBITMQ_NODENAME"]
    assert name == rabbitmq.node_name(cfg)  # what the broker, rabbitmq-diagnostics and epmd's stop all use
    return name


def test_each_run_dir_has_a_node_name_of_its_own_and_keeps_the_one_its_data_has(tmp_path: Path) -> None:
    # Named after the profile alone, a second clone's broker, on the epmd the
    # first had started, stopped at "the name rabbit-dev@localhost seems to be in use".
    first, second = tmp_path / "clone-a" / "run", tmp_path / "clone-b" / "run"
    assert _node(first) != _node(second)
    assert _node(first) == _node(first)
    assert _node(first).startswith("rabbit-dev-") and _node(first).endswith("@localhost")
    assert _node(first, "test").startswith("rabbit-test-")

    # Data made under an older name keeps it: its queues live under the
    # node's name, and a broker of it may be running still.
    (tmp_path / "dev" / "rabbitmq" / "mnesia" / "rabbit-dev@localhost").mkdir(parents=True)
    (tmp_path / "dev" / "rabbitmq" / "mnesia" / "rabbit-dev@localhost-plugins-expand").mkdir()
    assert _node(tmp_path) == "rabbit-dev@localhost"
    # Moved since (a clone renamed): the name it was made with, not the new path's.
    made = _node(tmp_path / "fresh")
    (tmp_path / "fresh" / "dev" / "rabbitmq" / "mnesia" / made).mkdir(parents=True)
    (tmp_path / "fresh").rename(tmp_path / "moved")
    assert _node(tmp_path / "moved") == made
