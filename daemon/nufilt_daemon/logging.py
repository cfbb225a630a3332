"""structlog setup: JSON lines for machines, a console renderer on a terminal.

Every line has `timestamp` (ISO 8601, UTC), `level`, `event`, `logger` and the bound context
(`job`, `checkpoint`, `step`, `version`, ...). Standard-library loggers (mlflow, watchdog,
urllib3) go through the same formatter, so one stream has one format.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO

import structlog

QUIET_LIBRARIES = ("watchdog", "urllib3", "mlflow", "alembic", "git")

# What `log.bind(...)` gives the code that passes a bound logger around: the configured wrapper class
# (structlog.stdlib.BoundLogger) and structlog's default both offer these methods.
Logger = structlog.typing.FilteringBoundLogger


def adopt_library_loggers() -> None:
    """Send libraries that install their own handlers (MLflow does, on import) through ours."""
    for name in QUIET_LIBRARIES:
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True


def configure_logging(level: str = "info", fmt: str = "auto", stream: IO[str] | None = None) -> None:
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # before MLflow is imported, if it is
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if console:
        renderer = structlog.dev.ConsoleRenderer()
        tail: list[structlog.types.Processor] = [renderer]
    else:
        renderer = structlog.processors.JSONRenderer()
        tail = [structlog.processors.format_exc_info, renderer]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # tests and the CLI may reconfigure
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LIBRARIES:  # their INFO/DEBUG is noise next to ours
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    adopt_library_loggers()
