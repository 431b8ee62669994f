"""The gateway forwards what its client sent: nothing added, nothing of anyone else's, nowhere unpublished."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest
from multidict import CIMultiDict

from mesh_common.requests import LEAVING
from mesh_gateway.routes import API, Route

AUTO = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


async def test_a_cookie_set_by_an_upstream_never_rides_on_another_request(fake_service, gateway, tokens):
    # By a host name: aiohttp's default cookie jar would ignore an IP address.
    service = await fake_service(1, address="localhost")
    client = await gateway(service)
    async with client.get("/api/v1/things", headers={**tokens.headers(), "X-Request-ID": "first"}) as r:
        assert r.cookies["session"].value == "for-first"  # passed back to the client it was meant for
    client.session.cookie_jar.clear()  # the next caller is someone else, with no cookies
    async with client.get("/api/v1/things", headers={**tokens.headers(), "X-Request-ID": "second"}) as r:
        seen = (await r.json())["headers"]
    assert "Cookie" not in seen


async def test_no_header_is_added_that_the_client_did_not_send(fake_service, gateway, tokens):
    service = await fake_service(1)
    client = await gateway(service)
    async with client.get("/api/v1/things", headers=tokens.headers(), skip_auto_headers=AUTO) as r:
        seen = (await r.json())["headers"]
    # An Accept-Encoding the client never sent would let the upstream
    # compress a body that the client cannot inflate.
    assert not {"Accept-Encoding", "User-Agent", "Accept"} & seen.keys()
    async with client.post("/api/v1/things", data=b"raw", headers=tokens.headers(), skip_auto_headers=AUTO) as r:
        seen = (await r.json())["headers"]
    assert "Content-Type" not in seen
    assert seen["Content-Length"] == "3"


async def test_a_compressed_body_goes_on_as_the_bytes_it_was_read_as(fake_service, gateway, tokens):
    # aiohttp inflates a request body as it reads it: what goes on is plain,
    # and must not be labelled with the client's Content-Encoding.
    service = await fake_service(1)
    client = await gateway(service)
    body = json.dumps({"title": "buy milk"}).encode()
    headers = {**tokens.headers(), "Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with client.post("/api/v1/things", data=gzip.compress(body), headers=headers) as r:
        assert r.status == 200, await r.text()
        seen = await r.json()
    assert seen["body"] == body.decode()
    assert "Content-Encoding" not in seen["headers"]
    assert seen["headers"]["Content-Length"] == str(len(body))
    async with client.post("/api/v1/things", data=body, headers=headers) as r:  # says gzip, is not
        assert r.status == 400
        assert (await r.json(content_type="application/problem+json"))["code"] == "MALFORMED_BODY"
    # Twice: aiohttp's C parser inflates by the last, its Python one by the first.
    twice = CIMultiDict({**tokens.headers(), "Content-Type": "application/json"})
    for encoding in ("identity", "gzip"):
        twice.add("Content-Encoding", encoding)
    async with client.post("/api/v1/things", data=gzip.compress(body), headers=twice) as r:
        assert r.status == 400
        assert (await r.json(content_type="application/problem+json"))["code"] == "MALFORMED_BODY"
    assert service.instances[0].hits == 1


async def test_a_compressed_body_whose_encoding_the_client_names_in_connection_goes_on_plain(
    fake_service, gateway, tokens
):
    # Named in Connection, Content-Encoding is hop-by-hop and already gone
    # from the copy when the inflated body's label is taken off.
    service = await fake_service(1)
    client = await gateway(service)
    body = json.dumps({"title": "buy milk"}).encode()
    packed = gzip.compress(body)
    head, answer = await raw_exchange(
        client,
        b"POST /api/v1/things HTTP/1.1\r\nHost: gateway\r\n"
        + f"Authorization: {tokens.headers()['Authorization']}\r\n".encode()
        + b"Connection: keep-alive, Content-Encoding\r\nContent-Encoding: gzip\r\n"
        + f"Content-Type: application/json\r\nContent-Length: {len(packed)}\r\n\r\n".encode()
        + packed,
    )
    assert head.startswith(b"HTTP/1.1 200"), head + answer
    seen = json.loads(answer)
    assert seen["body"] == body.decode()
    assert "Content-Encoding" not in seen["headers"]


async def test_the_query_string_is_forwarded_exactly_as_sent(fake_service, gateway, tokens):
    service = await fake_service(1)
    client = await gateway(service)
    query = "b=2&a=%3D%26+x&a=1&flag&c=%2B"
    async with client.get(f"/api/v1/things?{query}", headers=tokens.headers()) as r:
        assert (await r.json())["raw_query"] == query


async def test_head_keeps_the_length_of_the_body_it_does_not_send(fake_service, gateway, tokens):
    service = await fake_service(1)
    client = await gateway(service)
    headers = {**tokens.headers(), "X-Request-ID": "same"}
    async with client.get("/api/v1/things", headers=headers) as r:
        length = len(await r.read())
    client.session.cookie_jar.clear()  # the same request again, byte for byte
    async with client.head("/api/v1/things", headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(length)


async def test_a_large_body_is_streamed_with_its_length(fake_service, gateway, tokens):
    service = await fake_service(1)
    service.instances[0].mode = "large"
    client = await gateway(service)
    async with client.get("/api/v1/things", headers=tokens.headers()) as r:
        assert r.headers["Content-Length"] == str(1024 * 1024)
        assert "Transfer-Encoding" not in r.headers
        assert len(await r.read()) == 1024 * 1024


async def test_hop_by_hop_headers_and_those_named_in_any_connection_header_stay_behind(fake_service, gateway, tokens):
    service = await fake_service(1)
    client = await gateway(service)
    head, answer = await raw_exchange(
        client,
        b"GET /api/v1/things HTTP/1.1\r\nHost: gateway\r\n"
        + f"Authorization: {tokens.headers()['Authorization']}\r\n".encode()
        + b"Connection: keep-alive, X-First\r\nConnection: X-Second\r\n"
        b"X-First: 1\r\nX-Second: 2\r\nX-Kept: 3\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\r\n",
    )
    seen = json.loads(answer)["headers"]
    assert head.startswith(b"HTTP/1.1 200")
    assert seen["X-Kept"] == "3"
    assert not {"X-First", "X-Second", "Keep-Alive", "Proxy-Connection"} & seen.keys()


# An answer's body small enough to be buffered, or large enough to be streamed (proxy.BUFFER_LIMIT).
SIZES = pytest.mark.parametrize("size", [2, 1024 * 1024], ids=["buffered", "streamed"])


async def answer_of(fake_service, gateway, tokens, size: int, *, leaving: bool = False) -> CIMultiDict[str]:
    """The headers of a gateway's answer of ``size`` bytes, from an upstream that names X-Hop in Connection."""
    service = await fake_service(1)
    service.instances[0].mode = "hop_headers"
    client = await gateway(service)
    client.app[LEAVING].now = leaving  # as mesh_common.serve sets it on SIGTERM
    async with client.get(f"/api/v1/things?size={size}", headers=tokens.headers()) as r:
        assert (r.status, len(await r.read())) == (200, size)
        return CIMultiDict(r.headers)


@SIZES
async def test_an_answers_hop_by_hop_headers_and_those_its_connection_names_stay_behind(
    fake_service, gateway, tokens, size
):
    headers = await answer_of(fake_service, gateway, tokens, size)
    assert headers["X-Kept"] == "3"
    assert [name for name in ("X-Hop", "Keep-Alive") if name in headers] == []


@SIZES
async def test_a_leaving_gateway_says_in_each_answers_head_that_it_closes_the_connection(
    fake_service, gateway, tokens, size
):
    # Unsaid, Envoy could hand the connection its next request before the close arrives.
    assert "close" not in (await answer_of(fake_service, gateway, tokens, size)).get("Connection", "").lower()
    leaving = await answer_of(fake_service, gateway, tokens, size, leaving=True)
    assert leaving["Connection"].lower() == "close"


async def test_an_x_forwarded_for_the_client_names_in_connection_is_dropped(fake_service, gateway, tokens):
    service = await fake_service(1)
    client = await gateway(service)
    headers = {**tokens.headers(), "Connection": "keep-alive, X-Forwarded-For", "X-Forwarded-For": "6.6.6.6"}
    async with client.get("/api/v1/things", headers=headers) as r:
        body = await r.json()
    assert body["forwarded_for"] == "127.0.0.1"  # the gateway's own entry alone


async def test_a_path_kept_for_services_is_never_published(fake_service, gateway, tokens):
    service = await fake_service(1)
    (instance,) = service.instances
    client = await gateway(service)
    # Spelled as a client might: as is, below it, percent-encoded ("%69" is "i").
    for path in ("/api/v1/things/internal", "/api/v1/things/internal/x", "/api/v1/things/%69nternal"):
        async with client.get(path, headers=tokens.headers()) as r:
            assert r.status == 404, path
            assert (await r.json())["code"] == "NOT_FOUND"
    assert instance.hits == 0
    async with client.get("/api/v1/things/internally", headers=tokens.headers()) as r:
        assert r.status == 200  # a prefix of a name is not the name


async def test_a_prefix_spelled_encoded_is_a_404_not_a_target_the_upstream_refuses(fake_service, gateway, tokens):
    # Matched decoded, "/api/v1%2Fthings" is "/api/v1/things"; stripped as
    # sent, it left "%2Fthings", which the upstream's parser refused with a
    # text/plain 400 that the gateway passed on.
    service = await fake_service(1)
    client = await gateway(service)
    for path in ("/api/v1%2Fthings", "/api/v1%2fthings/1", "/api%2Fv1/things"):
        async with client.get(path, headers=tokens.headers()) as r:
            assert r.status == 404, path
            assert r.content_type == "application/problem+json", path
            assert (await r.json())["code"] == "NOT_FOUND"
    assert service.hits == 0
    async with client.get("/api/v1/things/a%2Fb", headers=tokens.headers()) as r:
        assert r.status == 200  # past the prefix, an encoded slash is the upstream's to read
        assert (await r.json())["path"] == "/things/a/b"


def test_the_prefix_is_stripped_only_where_the_client_spelled_it_out():
    todos = API.match("/api/v1/todos")
    assert todos is not None
    assert todos.upstream_path("/api/v1/todos/1") == "/todos/1"
    assert todos.upstream_path("/api/v1/to%64os") == "/to%64os"
    assert todos.upstream_path("/api/v1%2Ftodos") is None
    assert todos.upstream_path("/api/v1todos") is None
    # A route outside the prefix (an extra one) goes on as it came.
    assert Route("/echo", "echo").upstream_path("/echo/a%2Fb") == "/echo/a%2Fb"
    assert Route("/.well-known/jwks.json", "users", strip="").upstream_path("/.well-known/jwks.json") == (
        "/.well-known/jwks.json"
    )


def test_the_service_token_endpoint_is_not_published():
    assert API.match("/api/v1/auth/service-token") is None
    assert API.match("/api/v1/auth/login") is not None


def test_what_tells_whether_an_email_is_taken_or_checks_a_password_has_the_tighter_limit():
    # Registration and a profile's new email both answer 409 for a taken one:
    # probing through either is held to the logins' limit, and so is a
    # password change, which checks the current password as a login does.
    assert {
        ("POST", "/api/v1/users"),
        ("PATCH", "/api/v1/users/me"),
        ("POST", "/api/v1/auth/login"),
        ("POST", "/api/v1/users/me/password"),
    } <= API.auth


async def raw_exchange(client, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` as bytes and read one answer: (its head, its body).

    Raw, because a client library folds or rewrites Connection headers itself.
    """
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        length = int(
            next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split(b":")[1]
        )
        return head, await asyncio.wait_for(reader.readexactly(length), timeout=5)
    finally:
        writer.close()
