"""structlog set-up: configured once, from ``__main__``."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog


def configure_logging(fmt: str = "console", level: int = logging.INFO) -> None:
    """JSON lines in containers, a readable console elsewhere.

    ``merge_contextvars`` comes first so the ``request_id`` bound by the
    request middleware (or by a consumer) reaches every line.
    """
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    factory: structlog.types.WrappedLogger
    if fmt == "json":
        # orjson renders straight to bytes, written to the raw stream: the
        # access line is on every request's path, so this is structlog's
        # own recipe for speed.
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        shared.append(structlog.processors.format_exc_info)
        factory = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library; keep their warnings visible.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
