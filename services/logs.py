"""Logging for every splitserve process: plain text for people, JSON lines for log pipelines.

JSON records carry `ts` (ISO 8601, UTC), `level`, `logger`, `msg`, `request_id` (the request
being handled, from services/request_id.py; null outside requests), the process's static fields
(`component`, and `worker_id` / `role` on workers), any `extra={...}` fields of the call, and
`exc_info` for exceptions. Text lines carry the same request id in brackets.

vLLM configures its own `vllm` logger (in the worker and in the engine-core process it spawns);
`vllm_environment()` points it at the same formatter through VLLM_LOGGING_CONFIG_PATH.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

from services import request_id

LogFormat = Literal["text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class LogConfig(BaseSettings):
    """How a process logs; read from SPLITSERVE_LOG_FORMAT / SPLITSERVE_LOG_LEVEL (the CLI's
    `--log-format` sets the former for every process it starts)."""

    model_config = SettingsConfigDict(env_prefix="SPLITSERVE_LOG_")

    format: LogFormat = Field("text", description="text (for people) or json (one object a line)")
    level: LogLevel = Field("INFO", description="lowest level logged")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (the current request's, or None) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.current()
        return True


class TextFormatter(logging.Formatter):
    """Plain text with the request id in brackets ('-' outside requests)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.request_id = rid or "-"
        try:
            return super().format(record)
        finally:
            record.request_id = rid


class JsonFormatter(_BaseJsonFormatter):
    """One JSON object per record: ts, level, logger, msg, request_id, static fields, extras."""

    def __init__(self, static_fields: dict[str, Any] | None = None) -> None:
        super().__init__(
            ["levelname", "name", "message", "request_id"],
            rename_fields={"levelname": "level", "name": "logger", "message": "msg"},
            static_fields=static_fields or {},
            json_ensure_ascii=False,
            # vLLM's log-record factory adds its process name to every record of a process
            # that imports it (its text format's prefix); JSON records carry `component`
            reserved_attrs=[*RESERVED_ATTRS, "vllm_process_name"],
        )

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        log_data["ts"] = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
            timespec="milliseconds")
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.current()
        super().add_fields(log_data, record, message_dict)


def make_formatter(cfg: LogConfig, static: dict[str, Any]) -> logging.Formatter:
    """The formatter for a config."""
    return JsonFormatter(static) if cfg.format == "json" else TextFormatter()


def configure_logging(cfg: LogConfig, **static: Any) -> None:
    """Send this process's logs (root logger) to stderr in the configured format. `static`
    fields (e.g. component="gateway", worker_id=..., role=...) go into every JSON record."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(cfg, static))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(cfg.level)
    # Python warnings become records too (in JSON mode a line on stderr must be JSON).
    logging.captureWarnings(cfg.format == "json")


def vllm_logging_config(cfg: LogConfig, **static: Any) -> dict[str, Any]:
    """A logging.dictConfig for vLLM's processes (its `vllm` logger and the root logger)."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter", "static_fields": static} if cfg.format == "json"
        else {"()": f"{__name__}.TextFormatter"})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"splitserve": formatter},
        "handlers": {"splitserve": {"class": "logging.StreamHandler", "formatter": "splitserve",
                                    "filters": ["request_id"], "stream": "ext://sys.stderr"}},
        "loggers": {"vllm": {"handlers": ["splitserve"], "level": cfg.level,
                             "propagate": False}},
        "root": {"handlers": ["splitserve"], "level": cfg.level},
    }


def vllm_environment(cfg: LogConfig, path: Path, **static: Any) -> dict[str, str]:
    """Write vLLM's logging config to `path`; the environment that makes vLLM use it."""
    path.write_text(json.dumps(vllm_logging_config(cfg, **static)))
    return {"VLLM_CONFIGURE_LOGGING": "1", "VLLM_LOGGING_CONFIG_PATH": str(path),
            "VLLM_LOGGING_LEVEL": cfg.level}
