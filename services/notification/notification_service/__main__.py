"""``python -m notification_service``: the service, or ``dlq list`` / ``dlq replay``.

The only place that reads the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence

from aio_pika.exceptions import AMQPConnectionError, DeliveryError
from yarl import URL

from mesh_common.logs import configure_logging
from mesh_common.serve import bind_socket, run
from mesh_common.settings import SettingsError, env_str

from . import dlq
from .app import create_app
from .settings import Settings, topology_from_env
from .topology import Topology

# The DLQ commands are run by hand (``task dlq``): by default, against the
# native development stack's broker.
DEV_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def serve() -> None:
    settings = Settings.from_env(os.environ)
    configure_logging(settings.service.log_format)
    sock = bind_socket(settings.service.host, settings.service.port)
    settings = settings.with_port(sock.getsockname()[1])
    run(create_app(settings), sock)


def dead_letters(args: argparse.Namespace) -> None:
    # Only what the DLQ commands need, so that they run with AMQP_URL alone.
    amqp_url = env_str(os.environ, "AMQP_URL", DEV_AMQP_URL)
    topology = topology_from_env(os.environ)
    run = dlq.Run()
    finished = False
    try:
        if args.action == "list":
            asyncio.run(dlq.list_dead_letters(amqp_url, topology, limit=args.limit, reason=args.reason, run=run))
        else:
            replay = dlq.replay_dead_letters(
                amqp_url, topology, limit=args.limit, event_id=args.event_id, reason=args.reason, run=run
            )
            asyncio.run(replay)
        finished = True
    except (AMQPConnectionError, ConnectionError) as exc:
        raise SystemExit(f"cannot reach the broker at {URL(amqp_url).with_password(None)}: {exc}") from None
    except DeliveryError as exc:
        # Returned as unroutable, or nacked: that letter was not acked, so it stays in the DLQ.
        raise SystemExit(f"replay stopped, {topology.queue} did not take a letter ({exc}); it stays dead") from None
    except dlq.ReplayNotConfirmed as exc:
        # A broker in a resource alarm blocks a connection that publishes: the likeliest cause.
        raise SystemExit(
            f"replay stopped, a copy was {exc} (broker blocked, resource alarm?): its letter stays dead, and the"
            " copy may be delivered too once the broker recovers (the claims keep its email from going twice)"
        ) from None
    except KeyboardInterrupt:
        raise SystemExit(f"{args.action} interrupted") from None
    finally:
        # Cut short too: the letters a replay had sent are out of the DLQ already.
        if finished or run.letters:
            report(args, run, topology)


def report(args: argparse.Namespace, run: dlq.Run, topology: Topology) -> None:
    print(dlq.format_table(run.letters))
    if args.action == "list":  # taking none out
        print(f"{len(run.letters)} dead letter(s) shown, of {run.waiting} in {topology.dead_letters}")
    else:
        left = run.waiting - len(run.letters)
        print(f"{len(run.letters)} dead letter(s) replayed to {topology.queue}, {left} left in {topology.dead_letters}")
    if run.cut_short:
        again = "raise --limit" if args.action == "list" else "run again or raise --limit"
        print(f"stopped at --limit {args.limit}, more remain in {topology.dead_letters}: {again}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m notification_service", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    dlq_parser = commands.add_parser("dlq", help="inspect or replay the dead-letter queue")
    actions = dlq_parser.add_subparsers(dest="action", required=True)
    list_parser = actions.add_parser("list", help="show dead letters, leaving them in the queue")
    list_parser.add_argument("--limit", type=int, default=100)
    list_parser.add_argument("--reason", help="only the letters of this reason (REASON), as retries_exhausted")
    replay_parser = actions.add_parser("replay", help="send dead letters back to the service's queue")
    replay_parser.add_argument("--limit", type=int, default=1000)
    replay_parser.add_argument("--event-id", help="replay this event only")
    replay_parser.add_argument("--reason", help="replay the letters of this reason (REASON) only, as retries_exhausted")
    args = parser.parse_args(argv)
    try:
        if args.command == "dlq":
            dead_letters(args)
        else:
            serve()
    except SettingsError as exc:
        raise SystemExit(f"notification-service: {exc}") from None


if __name__ == "__main__":
    main()
