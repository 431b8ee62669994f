"""The infrastructure of the native stack, each part as a process description.

PostgreSQL, Redis and RabbitMQ come from Debian's packages, Consul from our
pinned build (scripts/ensure-consul), and the SMTP sink from aiosmtpd.
RabbitMQ is in rabbitmq.py, and the mesh's own processes are in mesh.py.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from .config import ROOT, StackConfig
from .procs import Proc, StackError, run_checked, say


def binary(name: str, *candidates: str) -> str:
    for candidate in (*candidates, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise StackError(f"{name} is not installed: run `task setup`")


def owned_dir(path: Path, user: str) -> Path:
    """A directory that ``user`` owns, reachable through every parent.

    A clone in a private directory (/root, or a temporary one: mode 700)
    would be closed to the postgres, redis and rabbitmq users, so parents get
    o+x: traverse only, never list. Those directories are not the stack's,
    so the change is said, with the way to do without it: once, since the
    bit is there after it.
    """
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        opened = []
        for parent in path.parents:
            mode = stat.S_IMODE(parent.stat().st_mode)
            if not mode & stat.S_IXOTH:
                os.chmod(parent, mode | stat.S_IXOTH)
                opened.append(str(parent))
        if opened:
            say(
                f"made {', '.join(reversed(opened))} traversable (o+x) for the {user} user;"
                " MESH_RUN_DIR=<a directory others can traverse> would have left it as it was",
                file=sys.stderr,
            )
    return path


# -- Consul --------------------------------------------------------------------
ENSURE_CONSUL = ROOT / "scripts" / "ensure-consul"
# How long ensure-consul takes when the binary is there already, with room:
# past it, a build has begun, which takes minutes and must not look like a hang.
QUICK_CONSUL = 3.0


def _consul_binary() -> str:
    with subprocess.Popen([str(ENSURE_CONSUL)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as built:
        try:
            try:
                out, err = built.communicate(timeout=QUICK_CONSUL)
            except subprocess.TimeoutExpired:
                say("building Consul (once, into a cache outside the repo): this takes several minutes ...")
                out, err = built.communicate()
        except BaseException:  # Ctrl-C: not waited for, as leaving the with-block would
            built.kill()
            raise
    if built.returncode != 0:
        raise StackError(f"no Consul binary: {err.strip()}")
    return out.strip()


def consul(cfg: StackConfig) -> Proc:
    p = cfg.ports
    return Proc(
        "consul",
        [
            _consul_binary(),
            "agent",
            "-dev",
            "-ui",
            "-config-file",
            str(ROOT / "consul" / "dev.hcl"),
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
            "-http-port",
            str(p.consul_http),
            "-dns-port",
            str(p.consul_dns),
            "-serf-lan-port",
            str(p.consul_serf_lan),
            "-serf-wan-port",
            str(p.consul_serf_wan),
            "-server-port",
            str(p.consul_server),
            "-grpc-port",
            "-1",
            "-grpc-tls-port",
            "-1",
        ],
        env={},
    )


# -- PostgreSQL ------------------------------------------------------------------
# Migration 0011 of the user-service has an SQL-standard function body.
MIN_POSTGRES = (14,)


def _pg_bin(name: str, data: Path | None = None) -> str:
    """``name`` of the newest installed PostgreSQL, or of the one ``data`` was made by.

    A data directory is only ever read by its own major version: after
    another one is installed beside it, the newest would refuse to start.
    """
    made_by = data / "PG_VERSION" if data is not None else None
    if made_by is not None and made_by.exists():
        version = made_by.read_text().strip()
        if _version(version) < MIN_POSTGRES:
            # scripts/setup checks the newest installed; a data directory kept
            # from before may hold an older one.
            raise StackError(
                f"{data} was made by PostgreSQL {version}, and the stack needs"
                f" {'.'.join(map(str, MIN_POSTGRES))} or later: upgrade it or remove it"
            )
        wanted = f"/usr/lib/postgresql/{version}/bin/{name}"
        if not os.access(wanted, os.X_OK):
            raise StackError(f"{data} was made by PostgreSQL {version}, not installed here: install it or remove it")
        return wanted
    # The newest installed major version: 15 after 9.6, so by number, not text.
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: _version(p.split("/")[4]))
    return binary(name, *(found[-1:]))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else 0 for part in text.split("."))


def postgres(cfg: StackConfig) -> Proc:
    base = owned_dir(cfg.run_dir / "postgres", "postgres")
    data = base / "data"
    if not (data / "PG_VERSION").exists():
        # Made aside and renamed once whole: initdb writes PG_VERSION before
        # the rest, so one cut short (Ctrl-C, its timeout) in place would
        # leave a directory that passes for made and never starts. What such
        # a start left aside, or in place before this, is no cluster.
        draft = base / "data.draft"
        for unfinished in (draft, data):
            shutil.rmtree(unfinished, ignore_errors=True)
        owned_dir(draft, "postgres")
        # The locale is set, not taken from the environment (where it may be
        # one this machine lacks): it decides what lower() folds, and
        # usernames and emails are compared through it.
        run_checked(
            [
                _pg_bin("initdb"),
                "-D",
                str(draft),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            user="postgres",
            timeout=120,
        )
        draft.rename(data)
    return Proc(
        "postgres",
        [
            _pg_bin("postgres", data),
            "-D",
            str(data),
            "-p",
            str(cfg.ports.postgres),
            "-c",
            "listen_addresses=127.0.0.1",
            # TCP only: everything connects to 127.0.0.1, and a socket path
            # under a deep checkout can pass the 107-byte limit of one,
            # which stops PostgreSQL at start.
            "-c",
            "unix_socket_directories=",
            "-c",
            "max_connections=300",
            # Not the machine's zone, which initdb wrote into the config:
            # timestamps come back in UTC, as from compose's image.
            "-c",
            "timezone=UTC",
        ],
        env={},
        user="postgres",
    )


def create_databases(cfg: StackConfig) -> None:
    run_checked(
        [
            _pg_bin("psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(cfg.ports.postgres),
            "-U",
            "postgres",
            # No ~/.psqlrc (it may turn AUTOCOMMIT off), and a database named,
            # not one a PGDATABASE of the caller's would choose.
            "-X",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
        ],
        user="postgres",
        # On stdin, read by us: a clone made under umask 077 is closed to the postgres user.
        stdin=(ROOT / "scripts" / "postgres" / "create-databases.sql").read_text(),
    )


def postgres_ready(cfg: StackConfig) -> bool:
    run_checked(
        [
            *(_pg_bin("psql"), "-X", "-h", "127.0.0.1", "-p", str(cfg.ports.postgres)),
            *("-U", "postgres", "-d", "postgres", "-c", "SELECT 1"),
        ],
        user="postgres",
        timeout=5,
    )
    return True


# -- Redis -----------------------------------------------------------------------
def redis(cfg: StackConfig) -> Proc:
    data = owned_dir(cfg.run_dir / "redis", "redis")
    return Proc(
        "redis",
        [
            binary("redis-server", "/usr/bin/redis-server"),
            "--port",
            str(cfg.ports.redis),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ],
        env={},
        user="redis",
    )


# -- SMTP sink ---------------------------------------------------------------------
def mailsink(cfg: StackConfig) -> Proc:
    return Proc(
        "mailsink",
        [
            cfg.python,
            "-m",
            "devstack.mailsink",
            "--smtp-port",
            str(cfg.ports.smtp),
            "--api-port",
            str(cfg.ports.mail_api),
        ],
        env={"PYTHONPATH": str(ROOT / "scripts")},
    )
