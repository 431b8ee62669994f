"""Pruning: published events and idempotency keys past their retention go, the rest stays."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import aiopg
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from mesh_common.app import worker_ctx
from mesh_common.outbox import prune_published
from mesh_common.pruning import DAY, Pruned, PruneSettings, prune, prune_batch
from mesh_common.settings import SettingsError
from mesh_common.testing import LeavesConsulFirst
from mesh_common.transactions import transaction
from todo_service import idempotency
from todo_service.app import create_app
from todo_service.idempotency import IdempotentRequest, prune_expired
from todo_service.model import NewTodo
from todo_service.settings import Settings
from todo_service.todos import Todos

HOUR = 3600


async def add_event(db: aiopg.Pool, *, age: int, published: int | None) -> str:
    """An outbox row created ``age`` seconds ago, published ``published`` seconds ago (None: not yet)."""
    event_id = str(uuid.uuid4())
    async with db.acquire() as conn, conn.cursor() as cur:
        # A routing key no queue is bound to: a relay that publishes it
        # delivers it nowhere.
        await cur.execute(
            "INSERT INTO outbox (id, routing_key, payload, correlation_id, created_at, published_at)"
            " VALUES (%s, 'test.pruning', '{}', 'test', now() - make_interval(secs => %s),"
            " now() - make_interval(secs => %s))",
            (event_id, age, published),
        )
    return event_id


async def add_keys(db: aiopg.Pool, count: int, *, age: int) -> None:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO idempotency_keys (owner_id, key, request_hash, response_status, response_body, created_at)"
            " SELECT gen_random_uuid(), 'key-' || n, 'hash', 201, '{}', now() - make_interval(secs => %s)"
            " FROM generate_series(1, %s) n",
            (age, count),
        )


async def ids(db: aiopg.Pool, table: str, column: str = "id") -> set[str]:
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT {column}::text FROM {table}")
        return {row[0] for row in await cur.fetchall()}


async def test_published_events_go_after_their_retention_and_unpublished_ones_never(db):
    old = await add_event(db, age=9 * DAY, published=8 * DAY)
    recent = await add_event(db, age=6 * DAY, published=6 * DAY)
    stuck = await add_event(db, age=30 * DAY, published=None)

    pruned = await prune(db, prune_published(7 * DAY), batch_size=100)

    assert pruned == Pruned(rows=1, batches=1, skipped=False)
    assert old not in await ids(db, "outbox")
    assert {recent, stuck} <= await ids(db, "outbox")


async def test_a_key_is_replayed_within_its_ttl_and_free_again_after_it(client, alice, db):
    headers = {**alice.headers, "Idempotency-Key": "order-7"}
    first = await (await client.post("/todos", json={"title": "Once"}, headers=headers)).json()
    await prune(db, prune_expired(DAY), batch_size=100)
    replayed = await client.post("/todos", json={"title": "Once"}, headers=headers)
    assert replayed.headers["Idempotent-Replayed"] == "true"

    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
    assert (await prune(db, prune_expired(DAY), batch_size=100)).rows == 1
    again = await client.post("/todos", json={"title": "Once"}, headers=headers)

    assert again.status == 201 and "Idempotent-Replayed" not in again.headers
    assert (await again.json())["id"] != first["id"]


async def test_a_batch_deletes_no_more_than_its_limit(db):
    await add_keys(db, 25, age=25 * HOUR)
    await add_keys(db, 3, age=23 * HOUR)
    job = prune_expired(DAY)

    assert await prune_batch(db, job, 10) == 10
    assert len(await ids(db, "idempotency_keys", "key")) == 18
    assert await prune(db, job, batch_size=10) == Pruned(rows=15, batches=2, skipped=False)
    assert len(await ids(db, "idempotency_keys", "key")) == 3


async def test_an_instance_leaves_a_job_to_the_instance_holding_it(db):
    await add_keys(db, 5, age=25 * HOUR)
    job = prune_expired(DAY)
    async with transaction(db) as other_instance:
        await other_instance.execute("SELECT pg_advisory_xact_lock(%s)", (job.lock_id,))
        pruned = await prune(db, job, batch_size=10)

    assert pruned == Pruned(rows=0, batches=0, skipped=True)
    assert len(await ids(db, "idempotency_keys", "key")) == 5


async def test_instances_pruning_at_once_delete_every_row_exactly_once(db, infra):
    await add_keys(db, 60, age=25 * HOUR)
    job = prune_expired(DAY)
    async with aiopg.create_pool(infra.database_url("todo"), minsize=1, maxsize=2) as second_instance:

        async def drain(pool: aiopg.Pool) -> int:
            # Each goes on until nothing is left, whoever holds the lock for a batch.
            rows = 0
            for _ in range(1000):  # bounded: 12 batches of work, and turns skipped meanwhile
                pruned = await prune(pool, job, batch_size=5)
                if not (pruned.skipped or pruned.rows):
                    return rows
                rows += pruned.rows
                if pruned.skipped:
                    await asyncio.sleep(0.001)  # the other holds the lock: let it work
            raise AssertionError("pruning never finished")

        deleted = await asyncio.gather(drain(db), drain(second_instance))

    assert sum(deleted) == 60
    assert await ids(db, "idempotency_keys", "key") == set()


async def test_the_service_prunes_every_interval(aiohttp_client, settings, tokens, db, poll):
    old_event = await add_event(db, age=9 * DAY, published=8 * DAY)
    kept_event = await add_event(db, age=HOUR, published=HOUR)
    await add_keys(db, 2, age=25 * HOUR)
    await add_keys(db, 1, age=HOUR)
    settings = dataclasses.replace(settings, prune=PruneSettings(interval=0.05))
    await aiohttp_client(LeavesConsulFirst(create_app(settings, verifier=tokens.verifier())))

    async def pruned() -> bool:
        return old_event not in await ids(db, "outbox") and len(await ids(db, "idempotency_keys", "key")) == 1

    await poll(pruned)
    assert kept_event in await ids(db, "outbox")


def test_the_key_ttl_and_the_pruning_come_from_the_environment():
    env = {"DATABASE_URL": "postgresql://todos@127.0.0.1/todos", "AMQP_URL": "amqp://127.0.0.1/"}
    defaults = Settings.from_env(env)
    tuned = Settings.from_env({**env, "IDEMPOTENCY_KEY_TTL": "3600", "OUTBOX_RETENTION_SECONDS": "60"})

    assert (defaults.idempotency_key_ttl, defaults.prune.outbox_retention) == (DAY, 7 * DAY)
    assert (tuned.idempotency_key_ttl, tuned.prune.outbox_retention) == (3600, 60)
    with pytest.raises(SettingsError, match="IDEMPOTENCY_KEY_TTL"):
        Settings.from_env({**env, "IDEMPOTENCY_KEY_TTL": "0"})


async def test_a_key_pruned_between_its_failed_claim_and_the_read_is_claimed_anew(db, alice, monkeypatch):
    todos = Todos(db, asyncio.Event())
    request = IdempotentRequest.of(f"race-{uuid.uuid4().hex}", {"title": "Once"})
    first = await todos.create(alice.id, NewTodo("Once"), correlation_id="race-1", idempotent=request)
    read_stored = idempotency.stored_response

    async def pruned_meanwhile(cur, owner_id, request):
        # The claim found the key and locked nothing; the pruner's delete
        # commits before the stored response is read.
        async with db.acquire() as conn, conn.cursor() as pruner:
            await pruner.execute(
                "DELETE FROM idempotency_keys WHERE owner_id = %s AND key = %s", (owner_id, request.key)
            )
        return await read_stored(cur, owner_id, request)

    monkeypatch.setattr(idempotency, "stored_response", pruned_meanwhile)
    second = await todos.create(alice.id, NewTodo("Once"), correlation_id="race-2", idempotent=request)

    assert (second.status, second.replayed) == (201, False)
    assert second.snapshot["id"] != first.snapshot["id"]
    # Claimed anew, and its answer stored: the key now replays the second todo.
    # Made without a claim, the second would leave no key, and a retry would make a third.
    monkeypatch.undo()
    retried = await todos.create(alice.id, NewTodo("Once"), correlation_id="race-3", idempotent=request)
    assert (retried.replayed, retried.snapshot["id"]) == (True, second.snapshot["id"])


async def test_a_background_worker_that_crashes_is_logged_when_it_crashes_not_at_shutdown():
    class Broken:
        async def run(self) -> None:
            raise RuntimeError("the database went away for good")

        def stop(self) -> None:
            pass

    with capture_logs() as logs:
        async with worker_ctx("prune", lambda app: Broken())(web.Application()):
            async with asyncio.timeout(5):
                while not logs:
                    await asyncio.sleep(0.01)

    assert [(entry["event"], entry["worker"]) for entry in logs] == [("worker_crashed", "prune")]
    assert "the database went away for good" in logs[0]["error"]
