"""``python -m devstack COMMAND``: what the Taskfile's native tasks call."""

from __future__ import annotations

import argparse
import os
import pwd
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from . import lock, sessions, stack
from .config import StackConfig
from .ports import as_running
from .procs import StackError, running, say, stop
from .signals import STOP_SIGNALS, Interrupted, held_back, ignore_signals, interrupt_on_signals

# `status`'s answer when nothing of the stack runs: LSB's "program is not
# running", as `systemctl status` gives it; 1 is an error.
NOT_RUNNING = 3

# How long a foreground `up`'s teardown waits for a command at work from
# another terminal (a `task scale`: a start, then a stop, each bounded).
TEARDOWN_LOCK_WAIT = stack.READY_TIMEOUT + stack.STOP_GRACE


def _print_urls(cfg: StackConfig) -> None:
    say("\ntodo-mesh is up (native):")
    for label, url in stack.urls(cfg):
        say(f"  {label:<28} {url}")


def cmd_up(cfg: StackConfig, args: argparse.Namespace) -> None:
    interrupt_on_signals()
    supervising = False
    try:
        with lock.held(cfg.run_dir, "up"):
            say(f"starting the native stack in {cfg.run_dir} ...")
            before = set(running(cfg.run_dir))
            _start(cfg, args, before)
            # Only the `up` that started the stack stays with it. Another, from a
            # second terminal, stayed too, and its Ctrl-C stopped the whole stack,
            # what the first terminal's `up` had started as well.
            supervising = not (args.detach or before)
        _print_urls(cfg)
        if not supervising:
            if not args.detach:
                say("\nIt ran before this `up`, which leaves it running: `task down` stops it.")
            return
        say("\nCtrl-C stops everything (or `task down` from another terminal).")
        supervising = wait_for_stop(cfg)
    finally:
        # Whatever ended the wait: a signal just before it began (an Interrupted)
        # or an error in it. Only `task down`, which ends it with False, has
        # stopped the stack already.
        if supervising:
            ignore_signals()
            say("\nstopping ...")
            # Not the lock's refusal at once: a `task scale` at work from another
            # terminal ends within its own timeouts, and then the stack stops.
            with lock.held(cfg.run_dir, "down", wait=TEARDOWN_LOCK_WAIT):
                stack.down(cfg)


def _start(cfg: StackConfig, args: argparse.Namespace, before: set[str]) -> None:
    """``up``'s start; failed or interrupted, it stops what it has started (unless --keep-on-failure)."""
    try:
        if args.infra_only:
            stack.up_infra(cfg)
        else:
            stack.up(cfg)
    except BaseException:
        ignore_signals()
        if not args.keep_on_failure:
            say("stopping what this start began ...")
            # Only what this call started: a `task up TODO=3` that fails must
            # not take down the stack that was already up.
            if before:
                for name in set(running(cfg.run_dir)) - before:
                    stop(cfg.run_dir, name)
            else:
                stack.down(cfg)
        raise


def wait_for_stop(cfg: StackConfig) -> bool:
    """Until Ctrl-C, SIGTERM or a closed terminal (True), or until `task down` has stopped everything (False)."""
    stopping = threading.Event()
    # SIGHUP too: a closed terminal would otherwise end this process alone,
    # and leave the stack (in sessions of its own) running with nobody to stop it.
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stopping.set())
    return supervise(cfg, stopping)


def supervise(cfg: StackConfig, stopping: threading.Event) -> bool:
    """Wait until told to stop (True), or until `task down` has stopped everything (False).

    Not until Consul alone is gone: a crash of it looked like `task down`,
    and the rest ran on with nobody left to stop it on Ctrl-C.
    """
    warned = False
    while not stopping.wait(1.0):
        alive = running(cfg.run_dir)
        if not alive:
            return False
        if "consul" not in alive and not warned:
            say("\nconsul has stopped (see its log); Ctrl-C stops the rest", file=sys.stderr)
            warned = True
    return True


def cmd_down(cfg: StackConfig, args: argparse.Namespace) -> None:
    try:
        # --unless-in-use (the end of `task test`, `task bench`): another run
        # may be joining the stack's users; it waits for that, then finds it in use.
        with lock.held(cfg.run_dir, "down", wait=TEARDOWN_LOCK_WAIT if args.unless_in_use else 0.0):
            stopped = stack.down(cfg, unless_in_use=args.unless_in_use)
    except stack.InUse as exc:
        say(f"{cfg.name} stack: {exc}", file=sys.stderr)
        return
    # Named: `task down` stops both profiles, one line each.
    print(f"{cfg.name} stack: " + (f"stopped {', '.join(stopped)}" if stopped else "nothing was running"))


def cmd_ps(cfg: StackConfig, _: argparse.Namespace) -> None:
    procs = running(cfg.run_dir)
    if not procs:
        print("nothing is running")
        return
    cfg = as_running(cfg)
    print(f"{'PROCESS':<20} {'PID':>7}  CONSUL")
    for name, pid in sorted(procs.items()):
        print(f"{name:<20} {pid:>7}  {stack.registered_id(cfg, name) or ''}")
    try:
        health = stack.health(cfg)
    except OSError:
        print("\n(Consul does not answer: no health to show)")
        return
    print("\nConsul's view:")
    for service_id, status in sorted(health.items()):
        print(f"  {service_id:<48} {status}")


def cmd_status(cfg: StackConfig, _: argparse.Namespace) -> int:
    """Whether the stack runs, by its exit status: what scripts/compose-stack asks before it takes compose's."""
    procs = running(cfg.run_dir)
    print(f"{cfg.name} stack: " + (f"running ({', '.join(sorted(procs))})" if procs else "not running"))
    return 0 if procs else NOT_RUNNING


def cmd_scale(cfg: StackConfig, args: argparse.Namespace) -> None:
    svc = {"user-service": "user", "todo-service": "todo", "notification-service": "notification"}.get(
        args.service, args.service
    )
    if svc not in ("user", "todo", "notification", "gateway"):
        raise StackError(f"unknown service {args.service!r}: use user, todo, notification or gateway")
    with lock.held(cfg.run_dir, f"scale {svc} {args.count}"):
        # Started against nothing, the instances waited in vain for Consul.
        if missing := [name for name in stack.INFRA if name not in running(cfg.run_dir)]:
            raise StackError(f"the native stack does not run (no {', '.join(missing)}): `task up` first")
        stack.keep_ports(cfg)
        stack.scale(cfg, svc, args.count)
    print(f"{svc}: {args.count} instance(s) passing in Consul")


def instance_count(raw: str) -> int:
    """``scale``'s count, 0 or more, as compose-stack's and MESH_<SVC>_INSTANCES."""
    # Below 0, `scale` stopped every instance, then waited for -1 to pass.
    if not raw.isdecimal():
        raise argparse.ArgumentTypeError(f"must be a whole number of 0 or more, got {raw!r}")
    return int(raw)


def not_ours(cfg: StackConfig, exc: PermissionError) -> str | None:
    """What to do about a file of the run directory that another user made, if ``exc`` is about one.

    A stack run as root, then a command as yourself: the run directory and its
    lock are root's, and opening them was a traceback.
    """
    if exc.filename is None:
        return None
    path = Path(os.fsdecode(exc.filename))
    if path not in (cfg.run_dir, *cfg.run_dir.parents) and cfg.run_dir not in path.parents:
        return None
    there = next((p for p in (path, *path.parents) if p.exists()), path)
    try:
        uid = there.stat().st_uid
    except OSError:
        return None
    if uid == os.geteuid():
        return f"{path}: permission denied, though {there} is yours: see its mode (ls -ld {there})"
    try:
        owner = pwd.getpwuid(uid).pw_name
    except KeyError:
        owner = f"user {uid}"
    stop = "`sudo .venv/bin/task down`" if uid == 0 else f"`task down` as {owner}"
    return (
        f"{path}: permission denied, and {there} is {owner}'s (a stack run as {owner}?):"
        f" stop it ({stop}), then remove {cfg.run_dir} as {owner};"
        " or give this one a run directory of its own: MESH_RUN_DIR=<dir>"
    )


def cmd_turn(cfg: StackConfig, args: argparse.Namespace) -> int:
    """Run a command in one turn at the stack: its test sessions, however many, are that turn's."""
    if not args.argv:
        raise StackError("turn: no command given (devstack turn -- CMD ...)")
    with sessions.turn(cfg, args.what):
        env = {**os.environ, lock.TURN_ENV: str(cfg.run_dir.resolve())}
        with held_back():
            child = subprocess.Popen(args.argv, env=env)

        # The turn is given back only once the command has ended, its own
        # teardown included (a benchmark stops its processes, deletes its
        # rows): a test run waiting for the turn must not start beside it.
        # Ctrl-C reaches the command from the terminal, as it reaches us;
        # a SIGTERM or SIGHUP sent to us alone is passed on.
        def pass_on(signum: int, _: object) -> None:
            if signum != signal.SIGINT:
                child.send_signal(signum)

        for sig in STOP_SIGNALS:
            signal.signal(sig, pass_on)
        return child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devstack", description=__doc__)
    parser.add_argument("--profile", choices=["dev", "test"], default="dev")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the stack and wait for health")
    up.add_argument("--detach", action="store_true", help="return once everything is healthy")
    up.add_argument("--infra-only", action="store_true", help="only PostgreSQL, Redis, RabbitMQ, Consul, SMTP")
    up.add_argument("--keep-on-failure", action="store_true", help="leave processes running for inspection")
    down = sub.add_parser("down", help="stop everything")
    down.add_argument(
        "--unless-in-use", action="store_true", help="leave it running while other test runs use it (task test's end)"
    )
    sub.add_parser("ps", help="what runs, and what Consul thinks of it")
    sub.add_parser("status", help=f"exit 0 if any of the stack runs, {NOT_RUNNING} if none does")
    sc = sub.add_parser("scale", help="run N instances of a service")
    sc.add_argument("service")
    sc.add_argument("count", type=instance_count)
    tu = sub.add_parser("turn", help="run a command (task bench's benchmarks) in one turn at the test stack")
    tu.add_argument("--what", default="benchmark", help="what others waiting for the turn are told it is")
    tu.add_argument("argv", nargs=argparse.REMAINDER, help="-- and the command")
    args = parser.parse_args(argv)
    if args.command == "turn" and args.argv[:1] == ["--"]:
        args.argv = args.argv[1:]
    commands: dict[str, Callable[[StackConfig, argparse.Namespace], int | None]] = {
        "up": cmd_up,
        "down": cmd_down,
        "ps": cmd_ps,
        "status": cmd_status,
        "scale": cmd_scale,
        "turn": cmd_turn,
    }
    # Put back on the way out: up ignores the stop signals while it tears down,
    # and a caller running main() in its own process (the tests) would be left
    # deaf to Ctrl-C and SIGTERM.
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        cfg = StackConfig.from_env(profile=args.profile)
        code = commands[args.command](cfg, args)
    except StackError as exc:
        say(f"error: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        if (said := not_ours(cfg, exc)) is None:
            raise
        say(f"error: {said}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        say(f"stopped by {exc}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        for sig, handler in handlers.items():
            if handler is not None:  # None: set outside Python, which cannot be put back
                signal.signal(sig, handler)
    return code or 0
