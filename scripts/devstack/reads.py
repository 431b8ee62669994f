"""Which environment variables a service reads: asked of its own code, not listed by hand.

A native stack process gets our environment (``procs.inherited_env``) with
its own settings over it (``Proc.env``). A setting a service reads that the
stack leaves unset would come from the developer's shell: natively only, as
compose's containers get none of it, unseen by the check that both stacks
give each service the same (tests/compose), and kept by a running instance
that the next ``up`` would find unchanged. So none is inherited.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Mapping


class Reads(Mapping[str, str]):
    """An environment that notes the name of each variable read from it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.names: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.names.add(name)
        return self.env[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.env)

    def __len__(self) -> int:
        return len(self.env)


def read_by(settings: str, env: Mapping[str, str]) -> frozenset[str]:
    """The variables that ``Settings.from_env`` of the module ``settings`` reads from ``env``.

    From a process's own environment, these are all it reads once none of
    them is inherited: each then has its value from ``env`` (or none), so
    the reading takes the same course whatever else is set.
    """
    reads = Reads(env)
    read_settings = importlib.import_module(settings).Settings.from_env
    # Refused: the process fails alike, at the same variable, and its log says which.
    with contextlib.suppress(Exception):
        read_settings(reads)
    return frozenset(reads.names)
