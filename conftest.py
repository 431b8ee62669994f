"""Fixtures shared by every test suite: the real parts of the native stack.

Tests talk to real PostgreSQL, Redis, RabbitMQ, Consul and an SMTP server,
started from Debian's packages and our pinned Consul by the same code as
``task up`` (scripts/devstack), on the test profile's own ports.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

from devstack import rabbitmq
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


@pytest.fixture(scope="session")
def amqp_vhost(infra: StackConfig) -> Callable[[str], str]:
    """The broker URL of a RabbitMQ virtual host of a suite's own, made if need be.

    A suite whose app publishes events uses one, so that they never reach
    the queues of the default one: the notification-service's, which
    nothing consumes during the suites, and which the end-to-end tests'
    notification-service would then work through first.
    """

    return lambda name: rabbitmq.vhost(infra, name)
