"""read_json_object: every body that is not a JSON object is a problem, never a 500; and which 503s a breaker counts."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import psycopg2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from mesh_common.app import service_app
from mesh_common.problems import instance_is_well, problem_middleware, read_json_object
from mesh_common.testing import eventually, loopback_service
from mesh_common.transactions import CommitOutcomeUnknown


async def echo(request: web.Request) -> web.Response:
    return web.json_response(await read_json_object(request))


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> TestClient[web.Request, web.Application]:
    app = web.Application(middlewares=[problem_middleware])
    app.router.add_post("/", echo)
    return await aiohttp_client(app)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{title", "application/json", 422),
        (b"\xff\xfe{}", "application/json", 422),
        (b"[]", "application/json", 422),
        # More digits than Python turns into an int (a plain ValueError).
        (b'{"n": ' + b"1" * 5000 + b"}", "application/json", 422),
        # Nested deep enough for a RecursionError, in 6 KB.
        (b"[" * 3000 + b"]" * 3000, "application/json", 422),
        (b"{}", "application/json; charset=no-such-charset", 415),
        (b"{}", "text/plain", 415),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_a_problem(
    client: TestClient[web.Request, web.Application], body: bytes, content_type: str, status: int
) -> None:
    async with client.post("/", data=body, headers={"Content-Type": content_type}) as response:
        assert response.status == status, await response.text()
        assert response.content_type == "application/problem+json"


async def test_a_json_object_is_read(client: TestClient[web.Request, web.Application]) -> None:
    async with client.post("/", json={"title": "ok"}) as response:
        assert response.status == 200
        assert await response.json() == {"title": "ok"}


async def test_a_compressed_json_object_is_read(client: TestClient[web.Request, web.Application]) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with client.post("/", data=gzip.compress(b'{"title": "ok"}'), headers=headers) as response:
        assert response.status == 200
        assert await response.json() == {"title": "ok"}


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decompress_is_a_400(
    client: TestClient[web.Request, web.Application], encoding: str
) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    async with client.post("/", data=b'{"title": "not compressed"}', headers=headers) as response:
        assert response.status == 400, await response.text()
        assert (await response.json(content_type="application/problem+json"))["code"] == "MALFORMED_BODY"
    # The next request works (on a new connection: the old one ended there).
    async with client.post("/", json={"title": "ok"}) as response:
        assert response.status == 200


class ServedLikeProduction(TestServer):
    """A test server that, like ``mesh_common.serve``, lets a handler run on when its client hangs up.

    aiohttp's own cancels it instead, and the handler never sees what it
    sees in production: its body's read failing.
    """

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return web.AppRunner(self.app, **{**kwargs, "handler_cancellation": False})


async def test_a_client_that_hangs_up_mid_body_is_not_an_error(aiohttp_client: Any) -> None:
    app = service_app(loopback_service("svc", "http://127.0.0.1:1"))  # with its access log
    app.router.add_post("/things", echo)
    client = await aiohttp_client(ServedLikeProduction(app))
    with capture_logs() as logs:
        _, writer = await asyncio.open_connection(client.host, client.port)
        # A body promised at 100 bytes, 10 sent, then gone: a cancelled
        # upload, or a proxy's slow-client guard cutting it off mid-body.
        head = "POST /things HTTP/1.1\r\nHost: svc\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        writer.write(head.encode() + b'{"title": ')
        await writer.drain()
        writer.close()
        await eventually(lambda: any(entry["event"] == "request" for entry in logs), within=5)
    assert "unhandled_error" not in [entry["event"] for entry in logs]
    assert [entry["path"] for entry in logs if entry["event"] == "client_gone_before_body"] == ["/things"]
    (access,) = [entry for entry in logs if entry["event"] == "request"]
    assert access["status"] == 499  # the client's doing, as nginx and the gateway count it: not a 5xx


async def answer_to(aiohttp_client: Any, failure: Exception) -> tuple[int, dict[str, str], str]:
    """What the problem middleware makes of a handler that raises ``failure``: status, headers, body."""

    async def handler(request: web.Request) -> web.Response:
        raise failure

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    async with client.get("/") as response:
        assert response.content_type == "application/problem+json"
        return response.status, dict(response.headers), await response.text()


@pytest.mark.parametrize(
    "failure",
    [TimeoutError(), psycopg2.OperationalError("server closed the connection"), psycopg2.InterfaceError("closed")],
)
async def test_a_database_away_or_too_slow_is_a_503_to_retry(aiohttp_client: Any, failure: Exception) -> None:
    status, headers, text = await answer_to(aiohttp_client, failure)
    assert status == 503
    assert headers["Retry-After"] == "1"
    body = json.loads(text)
    assert body["code"] == "DEPENDENCY_UNAVAILABLE"
    assert "closed" not in body["detail"]


async def test_a_commit_of_unknown_outcome_is_a_500_that_says_to_read_it_back_with_no_retry_after(
    aiohttp_client: Any,
) -> None:
    status, headers, text = await answer_to(aiohttp_client, CommitOutcomeUnknown("lost"))
    assert status == 500
    assert json.loads(text)["code"] == "OUTCOME_UNKNOWN"
    assert "Retry-After" not in headers


# A connection reset with the client still there (by a call the handler
# made) is no client gone: the bug it looks like.
@pytest.mark.parametrize("failure", [KeyError("secret detail"), ConnectionResetError("secret detail")])
async def test_anything_else_is_a_500_that_says_nothing(aiohttp_client: Any, failure: Exception) -> None:
    status, _, text = await answer_to(aiohttp_client, failure)
    assert status == 500
    assert "secret" not in text


@pytest.mark.parametrize(
    ("body", "well"),
    [
        (b'{"code": "TOO_BUSY"}', True),
        (b'{"code": "FEATURE_UNAVAILABLE"}', True),
        # Without its database an instance can answer nothing: counted.
        (b'{"code": "DEPENDENCY_UNAVAILABLE"}', False),
        (b'{"code": "SERVICE_UNAVAILABLE"}', False),
        (b'["TOO_BUSY"]', False),
        (b"Service Unavailable", False),
    ],
)
def test_only_a_503_whose_code_says_so_leaves_the_instance_well(body: bytes, well: bool) -> None:
    assert instance_is_well(body) is well
