"""The text of a failing statement is kept out of PostgreSQL's log for the user-service's role."""

from __future__ import annotations

import uuid

import aiopg
import psycopg2.errors
import pytest

from devstack.config import StackConfig
from devstack.procs import log_path
from mesh_common.testing import eventually


async def fail_with(url: str, secret: str) -> None:
    async with aiopg.connect(url) as conn, conn.cursor() as cur:
        with pytest.raises(psycopg2.errors.DivisionByZero):
            await cur.execute("SELECT 1 / 0 WHERE %s IS NOT NULL", (secret,))


async def test_a_failing_statement_of_the_user_services_is_logged_without_its_text(infra: StackConfig) -> None:
    # psycopg2 sends its parameters inside the statement: a verification
    # code, or a password's hash, in the log for as long as the log is kept.
    log = log_path(infra.run_dir, "postgres")
    start = log.stat().st_size
    code, other = f"code-{uuid.uuid4().hex}", f"todo-{uuid.uuid4().hex}"
    await fail_with(infra.database_url("user"), code)
    await fail_with(infra.database_url("todo"), other)  # the others' texts are logged, PostgreSQL's default

    def written() -> str:
        with log.open("rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")

    await eventually(lambda: other in written(), within=10)
    assert written().count("division by zero") == 2
    assert code not in written()
