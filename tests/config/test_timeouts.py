"""Deadlines in layers: each one inside the next, so the innermost failure is the one reported."""

from __future__ import annotations

from mesh_common.db import STATEMENT_TIMEOUT
from mesh_common.deadlines import REQUEST_DEADLINE
from mesh_gateway.routes import API


def test_a_services_database_calls_end_before_the_gateway_gives_up() -> None:
    # Else a hung database reaches the client as the gateway's bare 504, not
    # as the service's 503 DEPENDENCY_UNAVAILABLE naming the dependency.
    assert min(route.timeout for route in API.routes) > STATEMENT_TIMEOUT


def test_a_service_answers_before_the_gateway_gives_up_and_after_one_statement_could() -> None:
    # The whole request, after which a service gives up with its own 503
    # (mesh_common.deadlines), sits between the two.
    assert min(route.timeout for route in API.routes) > REQUEST_DEADLINE > STATEMENT_TIMEOUT
