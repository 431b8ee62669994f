"""The rate limiter's Redis connection over a unix socket and over TLS.

Each test starts its own redis-server (the Debian binary the stack uses), so
that a URL redis-py accepts is one the gateway's limiter accepts too.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh_common.testing import free_port
from mesh_gateway.redis_script import RedisScript, RedisScriptError

from .test_redis_script import ECHO_ARGS, call

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def start_redis(tmp: Path, *args: str, ready: Any) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--save", "", "--appendonly", "no", "--dir", str(tmp), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(timeout=10)  # reaped, or Popen warns later, in some other test
            raise RuntimeError("redis-server did not start")
        time.sleep(0.02)
    return process


def stop_redis(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def accepts_on(sock_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(sock_path))
        except OSError:
            return False
        return True


def accepts_at(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "redis.sock"
    process = start_redis(
        tmp_path, "--unixsocket", str(path), "--requirepass", "secret", ready=lambda: accepts_on(path)
    )
    try:
        yield path
    finally:
        stop_redis(process)


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[Path]:
    """A Redis whose user ``limiter`` may run anything but CLIENT, as a least-privilege ACL or a hosted Redis has it."""
    path = tmp_path / "redis.sock"
    acl = ("--user", "limiter", "on", ">secret", "~*", "+@all", "-client")
    process = start_redis(tmp_path, "--unixsocket", str(path), *acl, ready=lambda: accepts_on(path))
    try:
        yield path
    finally:
        stop_redis(process)


def certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name | None, ec.EllipticCurvePrivateKey],
    *,
    ca: bool,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0] if issuer[0] else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer[1], hashes.SHA256())


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("todo-mesh test CA", ca_key, (None, ca_key), ca=True)
    server = certificate("127.0.0.1", server_key, (ca.subject, ca_key), ca=False)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "server.pem").write_bytes(server.public_bytes(pem))
    (tmp_path / "server.key").write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    # redis-server binds its ports itself and takes no socket it inherits: no HeldPort to hand it.
    port = free_port()
    process = start_redis(
        tmp_path,
        *("--tls-port", str(port), "--tls-auth-clients", "no"),
        *("--tls-cert-file", str(tmp_path / "server.pem"), "--tls-key-file", str(tmp_path / "server.key")),
        *("--tls-ca-cert-file", str(tmp_path / "ca.pem")),
        ready=lambda: accepts_at(port),
    )
    try:
        yield port, tmp_path / "ca.pem"
    finally:
        stop_redis(process)


async def test_a_unix_socket_url_reaches_that_socket(unix_redis: Path) -> None:
    script = RedisScript(f"unix://:secret@{unix_redis}?db=3", ECHO_ARGS)
    try:
        assert await call(script, ["k"], [1]) == [b"k", b"1"]
    finally:
        script.close()


async def test_a_failed_set_up_fails_the_call_and_the_rest_of_that_read_is_dropped(unix_redis: Path) -> None:
    # AUTH fails; CLIENT SETNAME, SCRIPT LOAD and the call itself are then
    # refused in the same read, and none of those answers may be paired with
    # what the next connection will be waiting for.
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    script = RedisScript(f"unix://:wrong@{unix_redis}", ECHO_ARGS)
    try:
        reply = await call(script, ["k"], [1])
        assert isinstance(reply, RedisScriptError)
        assert "WRONGPASS" in str(reply) or "invalid password" in str(reply)
        await asyncio.sleep(0)  # let anything left of that read run
        assert errors == []
    finally:
        script.close()


async def test_a_user_denied_client_setname_still_runs_the_script(acl_redis: Path) -> None:
    script = RedisScript(f"unix://limiter:secret@{acl_redis}?db=2", ECHO_ARGS)
    try:
        # The name is refused (NOPERM); the connection serves all the same.
        assert await call(script, ["k"], [1]) == [b"k", b"1"]
        assert await call(script, ["k"], [2]) == [b"k", b"2"]
    finally:
        script.close()


async def test_a_rediss_url_speaks_tls_and_verifies_the_server(tls_redis: tuple[int, Path]) -> None:
    port, ca = tls_redis
    script = RedisScript(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}", ECHO_ARGS)
    try:
        assert await call(script, ["k"], [2]) == [b"k", b"2"]
    finally:
        script.close()
    # Without the CA, the server's certificate is not trusted: no connection.
    untrusting = RedisScript(f"rediss://127.0.0.1:{port}/0", ECHO_ARGS)
    try:
        reply = await call(untrusting, ["k"], [2])
        assert isinstance(reply, RedisScriptError)
        assert "cannot connect" in str(reply)
    finally:
        untrusting.close()


def test_an_unknown_scheme_is_refused_when_the_limiter_is_built() -> None:
    with pytest.raises(ValueError):
        RedisScript("http://127.0.0.1:6379/0", ECHO_ARGS)


async def test_the_tls_options_redis_py_honours_are_honoured(tls_redis: tuple[int, Path]) -> None:
    port, ca = tls_redis
    # The certificate is for 127.0.0.1: by the name localhost, trusted but not matched.
    urls = {
        f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none": True,  # nothing verified, as asked
        f"rediss://localhost:{port}/0?ssl_ca_certs={ca}": False,
        f"rediss://localhost:{port}/0?ssl_ca_certs={ca}&ssl_check_hostname=false": True,
        f"rediss://localhost:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required": False,
    }
    for url, connects in urls.items():
        script = RedisScript(url, ECHO_ARGS)
        try:
            reply = await call(script, ["k"], [3])
        finally:
            script.close()
        assert (reply == [b"k", b"3"]) is connects, (url, reply)


@pytest.mark.parametrize(
    ("url", "option"),
    [
        # A client certificate.
        ("rediss://:hunter2@redis:6380/0?ssl_certfile=/c.pem&ssl_keyfile=/k.pem", "ssl_certfile"),
        ("rediss://redis:6380/0?ssl_ca_path=/etc/ssl/certs", "ssl_ca_path"),
        ("redis://:hunter2@redis:6379/0?socket_timeout=3", "socket_timeout"),
        ("redis://redis:6379/0?protocol=3", "protocol"),
        ("redis://redis:6379/0?ssl_cert_reqs=none", "ssl_cert_reqs"),  # TLS asked of no TLS
        ("rediss://redis:6380/0?ssl_cert_reqs=sometimes", "ssl_cert_reqs"),
    ],
)
def test_an_option_the_limiter_would_not_honour_is_refused_when_it_is_built(url: str, option: str) -> None:
    with pytest.raises(ValueError, match=option) as refused:
        RedisScript(url, ECHO_ARGS)
    assert "hunter2" not in str(refused.value)
