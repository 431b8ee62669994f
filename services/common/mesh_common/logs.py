"""structlog set-up: configured once, from ``__main__``."""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import Any

import orjson
import structlog


def configure_logging(fmt: str = "console", level: int = logging.INFO) -> None:
    """JSON lines in containers, a readable console elsewhere.

    ``merge_contextvars`` comes first so the ``request_id`` bound by the
    request middleware (or by a consumer) reaches every line: ours and the
    libraries' (aio-pika, asyncio, aiohttp), which log through the standard
    library and are rendered here by the same processors.
    """
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    foreign_renderer: structlog.types.Processor
    factory: structlog.types.WrappedLogger
    if fmt == "json":
        # orjson renders straight to bytes, written to the raw stream: the
        # access line is on every request's path, so this is structlog's
        # own recipe for speed.
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        # A logging.Formatter must return str; library records are rare.
        foreign_renderer = structlog.processors.JSONRenderer(serializer=_orjson_str)
        # The traceback goes inside the object, as one string, not over lines.
        shared.append(structlog.processors.format_exc_info)
        factory = structlog.BytesLoggerFactory(sys.stderr.buffer)
        # A crash outside any logger (a port already taken at start-up, say)
        # would print a bare traceback, which a collector reads as one record
        # a line; it becomes one object, like the rest.
        sys.excepthook = _log_uncaught
    else:
        renderer = foreign_renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Ours go straight to the stream (above); the standard library's records
    # are rendered alike, with the name of the logger that made them.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, foreign_renderer],
        )
    )
    # Libraries log through the standard library; keep their warnings visible.
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    # Python's warnings too, which would otherwise print several raw lines.
    logging.captureWarnings(True)


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    structlog.get_logger().critical("uncaught_exception", exc_info=(kind, value, tb))


def _orjson_str(obj: Any, **kwargs: Any) -> str:
    return orjson.dumps(obj, **kwargs).decode()
