"""The README's first session, run as written against the whole stack.

A walkthrough is where a newcomer starts, and the first thing to rot when a
path, a field or a header changes: this runs its shell block, for a new user
each time, and checks what it says the reader will see.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from pathlib import Path

import aiohttp
import pytest

from devstack.config import StackConfig
from mesh_common.testing import communicate_within

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- readme-session -->"
TITLE = "Read docs/architecture.md"


def session_block(readme: str) -> str:
    """The ```sh block right after the marker."""
    match = re.search(re.escape(MARKER) + r"\s*```sh\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
    if match is None:
        pytest.fail(f"README.md has no ```sh block after {MARKER}")
    return match[1]


async def test_the_readmes_first_session_does_what_it_says(mesh: StackConfig) -> None:
    # The README's user, renamed: run twice on one database, "ada" would
    # already exist, and her todo would already be done.
    name = f"ada{uuid.uuid4().hex[:10]}"
    script = re.sub(r"\bada\b", name, session_block(README.read_text()))
    assert name in script and "Idempotency-Key" in script  # the block is the one this test knows
    env = {**os.environ, "API": f"{mesh.api_url}/api/v1", "MAIL": f"{mesh.mail_api_url}/api/v1"}
    # curl sends 127.0.0.1 to a developer's http_proxy too (CI's .ci/run sets
    # no_proxy, which hid it): the README tells its reader the same.
    for variable in ("no_proxy", "NO_PROXY"):
        env[variable] = ",".join(filter(None, ("127.0.0.1,localhost,::1", os.environ.get(variable))))
    shell = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await communicate_within(shell, 60)
    output = out.decode()
    print(output)
    assert shell.returncode == 0, output

    assert f'"username": "{name}"' in output  # registered: the profile came back
    assert re.search(r"^204$", output, re.MULTILINE), "the emailed code did not confirm the address"
    assert len(re.findall(r"^HTTP/1\.1 201", output, re.MULTILINE | re.IGNORECASE)) == 2
    assert len(re.findall(r"^idempotent-replayed: true", output, re.MULTILINE | re.IGNORECASE)) == 1
    assert len(re.findall(r"^x-upstream-instance: todo-service", output, re.MULTILINE | re.IGNORECASE)) == 2
    assert '"completed": true' in output

    # "give it a second": the email goes through an outbox relay and the broker.
    address = f"{name}@example.com"
    async with aiohttp.ClientSession(base_url=mesh.mail_api_url) as mail:

        async def subjects() -> list[str]:
            async with mail.get("/api/v1/messages") as r:
                messages = (await r.json())["messages"]
            return [m["Subject"] for m in messages if any(t["Address"] == address for t in m["To"])]

        async with asyncio.timeout(30):
            while f"Done: {TITLE}" not in await subjects():
                await asyncio.sleep(0.2)
