"""Fixtures shared by every test suite: the real parts of the native stack.

Tests talk to real PostgreSQL, Redis, RabbitMQ, Consul and an SMTP server,
started from Debian's packages and our pinned Consul by the same code as
``task up`` (scripts/devstack), on the test profile's own ports.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

from devstack.config import StackConfig
from devstack.stack import up_infra


@pytest.fixture(scope="session")
def stack_config() -> StackConfig:
    return StackConfig.from_env(profile="test")


@pytest.fixture(scope="session")
def infra(stack_config: StackConfig) -> StackConfig:
    """PostgreSQL, Redis, RabbitMQ, Consul and the SMTP sink, running.

    Idempotent: parts already running are left as they are. ``task test``
    stops them all at the end of the run.
    """
    up_infra(stack_config)
    return stack_config
