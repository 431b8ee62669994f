"""Typed app state of the notification-service."""

from __future__ import annotations

from aiohttp import web

from .consumer import EventConsumer
from .notifier import Notifier
from .reminders import ReminderScheduler
from .settings import Settings
from .stops import Stops

SETTINGS = web.AppKey("notification.settings", Settings)
NOTIFIER = web.AppKey("notification.notifier", Notifier)
SCHEDULER = web.AppKey("notification.scheduler", ReminderScheduler)
CONSUMER = web.AppKey("notification.consumer", EventConsumer)
STOPS = web.AppKey("notification.stops", Stops)
