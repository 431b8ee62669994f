"""``python -m user_service``: the only place that reads the environment.

    python -m user_service                      serve
    python -m user_service rotate-keys          the next signing key signs; the active one turns retiring
    python -m user_service retire-keys [--kid]  retiring keys leave the JWKS; their tokens are refused
    python -m user_service rotate-keys --compromised
                                                after a leak: every key is retired, new ones sign

The first two refuse a change that would cut valid tokens short (exit
status 1): rotating to a next key published less than
SIGNING_KEY_REFRESH_SECONDS + 330 s ago (6 minutes by default; two rotations
in a row), and retiring a key that stopped signing less than
max(ACCESS_TOKEN_TTL, SERVICE_TOKEN_TTL) + SIGNING_KEY_REFRESH_SECONDS + 30 s
ago (11 minutes by default).
``--force`` does it anyway. ``--compromised`` refuses nothing: cutting every
token short is what it is for.
"""

import argparse
import asyncio
import os

import aiopg

from mesh_common.db import migrate
from mesh_common.logs import configure_logging
from mesh_common.serve import bind_socket, run
from mesh_common.settings import env_log_format, env_str

from .app import MIGRATIONS, create_app
from .settings import Settings, TokenPolicy
from .signing_keys import (
    KeyChangeRefused,
    ensure_keys,
    next_key_min_age,
    replace_compromised_keys,
    retire_keys,
    retiring_min_age,
    rotate_keys,
)


async def manage_keys(
    database_url: str, command: str, kid: str | None, *, tokens: TokenPolicy, force: bool, compromised: bool = False
) -> None:
    """``rotate-keys`` or ``retire-keys``, waiting as long as ``tokens`` (the service's settings) needs."""
    async with aiopg.create_pool(database_url, minsize=1, maxsize=1) as pool:
        await migrate(pool, MIGRATIONS)
        try:
            if command == "rotate-keys" and compromised:
                print(await replace_compromised_keys(pool))
            elif command == "rotate-keys":
                await ensure_keys(pool)
                print(await rotate_keys(pool, min_published=next_key_min_age(tokens), force=force))
            else:
                retired = await retire_keys(pool, kid, min_retiring=retiring_min_age(tokens), force=force)
                print("\n".join(retired) or "no retiring key")
        except KeyChangeRefused as exc:
            raise SystemExit(f"{command}: refused: {exc}") from None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m user_service")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "rotate-keys", "retire-keys"])
    parser.add_argument("--kid", help="retire only this key")
    parser.add_argument("--force", action="store_true", help="even if valid tokens are cut short")
    parser.add_argument(
        "--compromised", action="store_true", help="rotate-keys after a leak: retire every key, next included"
    )
    args = parser.parse_args()
    if args.compromised and args.command != "rotate-keys":
        parser.error("--compromised goes with rotate-keys")
    if args.kid is not None and args.command != "retire-keys":
        # Ignored, "rotate-keys --kid K" would rotate whatever key signs, K or not.
        parser.error("--kid goes with retire-keys")
    if args.command != "serve":
        configure_logging(env_log_format(os.environ))
        tokens = TokenPolicy.from_env(os.environ)
        database_url = env_str(os.environ, "DATABASE_URL")
        asyncio.run(
            manage_keys(
                database_url, args.command, args.kid, tokens=tokens, force=args.force, compromised=args.compromised
            )
        )
        return
    settings = Settings.from_env(os.environ)
    configure_logging(settings.service.log_format)
    sock = bind_socket(settings.service.host, settings.service.port)
    settings = settings.with_port(sock.getsockname()[1])
    run(create_app(settings), sock)


if __name__ == "__main__":
    main()
