"""The native SMTP sink: a real SMTP server (aiosmtpd) that keeps what it gets.

It answers the subset of Mailpit's HTTP API that our tests and docs use, so
the same checks work natively and against Mailpit in compose:
``GET /api/v1/messages``, ``GET /api/v1/message/{ID}``, ``DELETE /api/v1/messages``.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session

MESSAGES = web.AppKey("mailsink.messages", list[dict[str, Any]])


class Keeper:
    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        text = parsed.get_body(preferencelist=("plain",))
        html = parsed.get_body(preferencelist=("html",))
        self.messages.append(
            {
                "ID": uuid.uuid4().hex,
                "MessageID": str(parsed.get("Message-ID", "")),
                "From": {"Address": envelope.mail_from},
                "To": [{"Address": rcpt} for rcpt in envelope.rcpt_tos],
                "Subject": str(parsed.get("Subject", "")),
                "Created": datetime.now(UTC).isoformat(),
                "Headers": {k: str(v) for k, v in parsed.items()},
                "Text": text.get_content() if text is not None else "",
                "HTML": html.get_content() if html is not None else "",
            }
        )
        return "250 Message accepted for delivery"


def _summary(message: dict[str, Any]) -> dict[str, Any]:
    return {k: message[k] for k in ("ID", "MessageID", "From", "To", "Subject", "Created")}


async def list_messages(request: web.Request) -> web.Response:
    messages = request.app[MESSAGES]
    return web.json_response({"total": len(messages), "messages": [_summary(m) for m in reversed(messages)]})


async def get_message(request: web.Request) -> web.Response:
    for message in request.app[MESSAGES]:
        if message["ID"] == request.match_info["id"]:
            return web.json_response(message)
    raise web.HTTPNotFound()


async def delete_messages(request: web.Request) -> web.Response:
    request.app[MESSAGES].clear()
    return web.Response(text="ok")


async def main(smtp_port: int, api_port: int) -> None:
    messages: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    keeper = Keeper(messages)
    # SMTPUTF8 as Mailpit offers it: without it, mail to a non-ASCII address
    # (which the user-service takes) would be refused natively and sent in compose.
    smtp = await loop.create_server(
        lambda: SMTP(keeper, hostname="mailsink.local", enable_SMTPUTF8=True), "127.0.0.1", smtp_port
    )
    app = web.Application()
    app[MESSAGES] = messages
    app.router.add_get("/api/v1/messages", list_messages)
    app.router.add_delete("/api/v1/messages", delete_messages)
    app.router.add_get("/api/v1/message/{id}", get_message)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", api_port).start()
    print(f"mailsink: SMTP on 127.0.0.1:{smtp_port}, API on 127.0.0.1:{api_port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        smtp.close()
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--api-port", type=int, default=8025)
    args = parser.parse_args()
    asyncio.run(main(args.smtp_port, args.api_port))
