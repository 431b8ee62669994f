"""The background work, as cleanup contexts: delivery, the consumer, the reminder scheduler.

``create_app`` adds them after the database, AMQP (one connection to
consume on, one to publish on: publisher.py), Consul and HTTP contexts they
use, and before the Consul registration; cleanup runs in reverse, so the
consumer has stopped (and drained) before the AMQP connections close.
The consumer's and the scheduler's stops begin together, though (``Stops``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from mesh_common.amqp import AMQP, AMQP_PUBLISHING
from mesh_common.app import WorkerEnd
from mesh_common.db import DB
from mesh_common.discovery import WATCHES
from mesh_common.http import HTTP_SESSION, SERVICE_CLIENT

from .consumer import EventConsumer
from .directory import ServiceTokens, UserDirectory
from .events import EventHandler
from .keys import CONSUMER, NOTIFIER, SCHEDULER, SETTINGS, STOPS
from .mailer import Mailer
from .notifier import Notifier
from .reminders import Reminders, ReminderScheduler

# How long the consumer's drain, and the scheduler's last round, may take at
# shutdown before what they still have in hand is cut short. Shorter than a
# send can take (Mailer.longest_send, about 75 s with the defaults) on
# purpose: each, with the unwinding after it, must end within compose's 20 s
# stop_grace_period, after which SIGKILL would cut the send short with no
# chance to record it. Cut short by us, a send in DATA is counted as one
# whose outcome is unknown (sent once more at most), one before DATA
# released (notifier.py), and its event or reminder waits for the next start.
DRAIN_TIMEOUT = 10.0
SCHEDULER_STOP_TIMEOUT = 10.0


@asynccontextmanager
async def delivery_ctx(app: web.Application) -> AsyncIterator[None]:
    """The notifier (SMTP, user lookups, idempotency) and the scheduler, not yet running."""
    settings = app[SETTINGS]
    # Bound first: as an argument, mypy would want the key typed as the parameter (a Mapping).
    watches = app[WATCHES]
    tokens = ServiceTokens(
        app[HTTP_SESSION],
        app[SERVICE_CLIENT],
        watches,
        service=settings.user_service,
        client_id=settings.client_id,
        client_secret=settings.client_secret,
    )
    directory = UserDirectory(app[SERVICE_CLIENT], tokens, service=settings.user_service)
    mailer = Mailer(settings.smtp)
    app[NOTIFIER] = notifier = Notifier(app[DB], mailer, directory, sender=settings.smtp.mail_from)
    app[SCHEDULER] = ReminderScheduler(app[DB], notifier, poll_interval=settings.reminder_poll_interval)
    try:
        yield
    finally:
        await mailer.close()


@asynccontextmanager
async def consumer_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    reminders = Reminders(
        app[DB],
        lead=settings.reminder_lead,
        wake_window=settings.reminder_poll_interval,
        wake=app[SCHEDULER].wake,
    )
    app[CONSUMER] = consumer = EventConsumer(
        app[AMQP],
        EventHandler(app[NOTIFIER], reminders, retention=settings.retention),
        settings.topology,
        publishing=app[AMQP_PUBLISHING],
        prefetch=settings.prefetch,
        retry_limit=settings.retry_limit,
    )
    await consumer.start()

    async def stop() -> None:
        app[NOTIFIER].stop()  # before the drain: what has not claimed its email gives its event back
        await consumer.stop(drain_timeout=DRAIN_TIMEOUT)

    app[STOPS].add("consumer", stop)
    try:
        yield
    finally:
        await app[STOPS].finish("consumer")


@asynccontextmanager
async def scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
    scheduler = app[SCHEDULER]
    ended = WorkerEnd("reminder-scheduler")
    task = asyncio.create_task(scheduler.run(), name=ended.name)
    task.add_done_callback(ended)

    async def stop() -> None:
        ended.stopping = True
        app[NOTIFIER].stop()
        scheduler.stop()
        _, still_running = await asyncio.wait({task}, timeout=SCHEDULER_STOP_TIMEOUT)
        for stuck in still_running:  # a round stuck on a dependency: give up on it
            stuck.cancel()
        if still_running:  # and let it unwind before what it uses closes
            await asyncio.wait(still_running, timeout=SCHEDULER_STOP_TIMEOUT)

    app[STOPS].add("scheduler", stop)
    try:
        yield
    finally:
        await app[STOPS].finish("scheduler")
