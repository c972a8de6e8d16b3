"""Logging set-up for the command-line programs (library code never adds handlers)."""

from __future__ import annotations

import logging
import logging.config
from pathlib import Path

__all__ = ["configure_logging"]


def configure_logging(level: str = "INFO", *, log_file: Path | None = None) -> None:
    """One line per event to stderr, or to ``log_file`` (rotated) for a detached daemon."""
    handler: dict[str, object] = {"class": "logging.StreamHandler", "formatter": "plain"}
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = {"class": "logging.handlers.RotatingFileHandler", "filename": str(log_file),
                   "maxBytes": 10_000_000, "backupCount": 5, "formatter": "plain"}
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"main": handler},
        "root": {"level": level.upper(), "handlers": ["main"]},
        # pika reports every dropped connection at ERROR; BrokerSession already says it once.
        # Parsl logs every poll and block at INFO; the htex engine logs block changes itself.
        "loggers": {"pika": {"level": "CRITICAL"}, "aiormq": {"level": "CRITICAL"},
                    "aio_pika": {"level": "WARNING"}, "httpx": {"level": "WARNING"},
                    "parsl": {"level": "WARNING"}},
    })
