"""``python -m user_service``: the only place that reads the environment.

    python -m user_service                      serve
    python -m user_service rotate-keys          new active signing key; the old one turns retiring
    python -m user_service retire-keys [--kid]  retiring keys leave the JWKS; their tokens are refused

Retire at least one access-token lifetime (plus SIGNING_KEY_REFRESH_SECONDS)
after rotating, or tokens signed just before the rotation are cut short.
"""

import argparse
import asyncio
import os

import aiopg

from mesh_common.db import migrate
from mesh_common.logs import configure_logging
from mesh_common.serve import bind_socket, run
from mesh_common.settings import env_str

from .app import MIGRATIONS, create_app
from .settings import Settings
from .signing_keys import ensure_keys, retire_keys, rotate_keys


async def manage_keys(database_url: str, command: str, kid: str | None) -> None:
    async with aiopg.create_pool(database_url, minsize=1, maxsize=1) as pool:
        await migrate(pool, MIGRATIONS)
        if command == "rotate-keys":
            await ensure_keys(pool)
            print(await rotate_keys(pool))
        else:
            print("\n".join(await retire_keys(pool, kid)) or "no retiring key")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m user_service")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "rotate-keys", "retire-keys"])
    parser.add_argument("--kid", help="retire only this key")
    args = parser.parse_args()
    if args.command != "serve":
        configure_logging(env_str(os.environ, "LOG_FORMAT", "console"))
        asyncio.run(manage_keys(env_str(os.environ, "DATABASE_URL"), args.command, args.kid))
        return
    settings = Settings.from_env(os.environ)
    configure_logging(settings.service.log_format)
    sock = bind_socket(settings.service.host, settings.service.port)
    settings = settings.with_port(sock.getsockname()[1])
    run(create_app(settings), sock)


if __name__ == "__main__":
    main()
