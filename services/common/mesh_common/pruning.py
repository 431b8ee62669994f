"""Periodic, bounded deletion of rows past their retention.

A service lists its ``PruneJob``s (the outbox's comes from
``outbox.prune_published``, the others are its own SQL) and runs them for the
app's lifetime with ``prune_ctx``. Every ``interval`` seconds each job deletes
batches of at most ``batch_size`` rows until a batch comes back short. A batch
is its own short transaction: a large backlog is worked off without holding
many row locks for long, and a shutdown waits for one batch at most.

Every instance runs the same jobs. A batch first takes its job's
``pg_try_advisory_xact_lock``, and an instance that does not get it leaves the
job to the one that did until its next round. The deletes are idempotent, so
the lock saves duplicated work rather than guarding correctness; being
transaction-scoped, it cannot outlive a cancelled batch on a pooled connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiopg
import structlog

from .app import CleanupCtx, wait_event, worker_ctx
from .db import DB
from .settings import SettingsError, env_float, env_int
from .transactions import server_cancels_as_errors, transaction

log = structlog.get_logger()
DAY = 24 * 3600


@dataclass(frozen=True, slots=True)
class PruneSettings:
    interval: float = 600.0
    batch_size: int = 1000
    # Long enough to trace a delivered event back to its row.
    outbox_retention: int = 7 * DAY

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PruneSettings:
        return cls(
            interval=env_float(env, "PRUNE_INTERVAL_SECONDS", 600.0),
            batch_size=env_int(env, "PRUNE_BATCH_SIZE", 1000),
            outbox_retention=env_int(env, "OUTBOX_RETENTION_SECONDS", 7 * DAY),
        )

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.batch_size < 1:
            raise SettingsError("PRUNE_INTERVAL_SECONDS and PRUNE_BATCH_SIZE must be positive")
        if self.outbox_retention < 0:
            raise SettingsError("OUTBOX_RETENTION_SECONDS must not be negative")


@dataclass(frozen=True, slots=True)
class PruneJob:
    """One table's pruning: ``sql`` deletes at most ``%(batch)s`` rows past their retention."""

    name: str
    sql: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def lock_id(self) -> int:
        # Derived from the name alone, so that every instance and version
        # agrees on it; advisory locks are per database, so services sharing
        # a cluster do not contend.
        digest = hashlib.blake2b(f"mesh.prune.{self.name}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True, slots=True)
class Pruned:
    rows: int
    batches: int
    skipped: bool  # another instance held the job


async def prune_batch(pool: aiopg.Pool, job: PruneJob, batch_size: int) -> int | None:
    """Delete one batch; ``None`` if another instance is pruning the same job."""
    async with transaction(pool) as cur:
        await cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (job.lock_id,))
        (locked,) = await cur.fetchone()
        if not locked:
            return None
        await cur.execute(job.sql, {**job.params, "batch": batch_size})
        return int(cur.rowcount)


async def prune(
    pool: aiopg.Pool, job: PruneJob, *, batch_size: int, keep_going: Callable[[], bool] = lambda: True
) -> Pruned:
    """Run ``job`` until a batch comes back short, another instance takes over, or ``keep_going()`` is false."""
    rows = batches = 0
    while True:
        deleted = await prune_batch(pool, job, batch_size)
        if deleted is None:
            return Pruned(rows, batches, skipped=True)
        rows += deleted
        batches += 1
        if deleted < batch_size or not keep_going():
            return Pruned(rows, batches, skipped=False)


class Pruner:
    def __init__(self, pool: aiopg.Pool, jobs: Sequence[PruneJob], settings: PruneSettings) -> None:
        self._pool = pool
        self._jobs = tuple(jobs)
        self._settings = settings
        self._wake = asyncio.Event()
        self._stopping = False

    def stop(self) -> None:
        """Make ``run`` return after the batch in hand (see ``worker_ctx``)."""
        self._stopping = True
        self._wake.set()

    async def run_round(self) -> None:
        for job in self._jobs:
            if self._stopping:
                return
            started = time.monotonic()
            try:
                with server_cancels_as_errors():
                    pruned = await prune(
                        self._pool, job, batch_size=self._settings.batch_size, keep_going=lambda: not self._stopping
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The database is away: the rows wait for the next round.
                log.warning("prune_failed", job=job.name, error=type(exc).__name__)
                continue
            log.info(
                "rows_pruned",
                job=job.name,
                rows=pruned.rows,
                batches=pruned.batches,
                skipped=pruned.skipped,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )

    async def run(self) -> None:
        # The first round waits an interval too: start-up (migrations, a
        # deploy's instances all starting) is busy enough without it.
        while not self._stopping:
            await wait_event(self._wake, self._settings.interval)
            if not self._stopping:
                await self.run_round()


def prune_ctx(settings: PruneSettings, jobs: Sequence[PruneJob]) -> CleanupCtx:
    """Prune for the app's lifetime. Needs the database context first."""
    return worker_ctx("prune", lambda app: Pruner(app[DB], jobs, settings))
