"""JSON and text logs with the request id; vLLM's logging config; request id validation."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
import warnings
from typing import Iterator

import pytest

from services import request_id
from services.logs import (
    JsonFormatter,
    LogConfig,
    RequestIdFilter,
    TextFormatter,
    configure_logging,
    vllm_environment,
)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restore the root logger's handlers and level after a test reconfigures it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_json_record_fields() -> None:
    logger, out = capture(JsonFormatter({"component": "worker", "worker_id": "decode-0-ab",
                                         "role": "decode"}))
    logger.info("outside %s", "requests")
    with request_id.bound("req-42"):
        logger.warning("prefill %s: %d tokens", "cmpl-1", 17, extra={"engine_request_id": "e1"})
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["request_id"] is None
    assert first["msg"] == "outside requests"
    assert second == {"ts": second["ts"], "level": "WARNING", "logger": logger.name,
                      "msg": "prefill cmpl-1: 17 tokens", "request_id": "req-42",
                      "component": "worker", "worker_id": "decode-0-ab", "role": "decode",
                      "engine_request_id": "e1"}
    assert second["ts"].endswith("+00:00") and "T" in second["ts"]


def test_json_exception_and_unicode() -> None:
    logger, out = capture(JsonFormatter())
    try:
        raise RuntimeError("engine died")
    except RuntimeError:
        logger.exception("failed: héllo")
    rec = json.loads(out.getvalue())
    assert rec["level"] == "ERROR" and rec["msg"] == "failed: héllo"
    assert "RuntimeError: engine died" in rec["exc_info"]


def test_text_carries_request_id() -> None:
    logger, out = capture(TextFormatter())
    logger.info("idle")
    with request_id.bound("abc"):
        logger.info("busy")
    idle, busy = out.getvalue().splitlines()
    assert f" INFO {logger.name} [-]: idle" in idle
    assert f" INFO {logger.name} [abc]: busy" in busy


async def test_request_id_is_per_task() -> None:
    seen: dict[str, str | None] = {}

    async def handle(rid: str) -> None:
        with request_id.bound(rid):
            await asyncio.sleep(0.01)
            seen[rid] = request_id.current()

    await asyncio.gather(handle("a"), handle("b"))
    assert seen == {"a": "a", "b": "b"}
    assert request_id.current() is None


@pytest.mark.parametrize("value", ["x", "chatcmpl-abc_123.4:5", "A" * request_id.MAX_LENGTH])
def test_valid_request_ids(value: str) -> None:
    assert request_id.validate(value) == value


@pytest.mark.parametrize("value", ["", "has space", "tab\there", "newline\n", "é",
                                   "A" * (request_id.MAX_LENGTH + 1), "nul\x00"])
def test_invalid_request_ids(value: str) -> None:
    with pytest.raises(request_id.InvalidRequestId, match="printable ASCII"):
        request_id.validate(value)


def test_configure_logging_json_from_environment(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str],
                                                 root_logging: None) -> None:
    monkeypatch.setenv("SPLITSERVE_LOG_FORMAT", "json")
    monkeypatch.setenv("SPLITSERVE_LOG_LEVEL", "WARNING")
    cfg = LogConfig()
    assert (cfg.format, cfg.level) == ("json", "WARNING")
    configure_logging(cfg, component="gateway")
    logging.getLogger("t").info("dropped")
    with request_id.bound("r1"):
        logging.getLogger("t").warning("kept")
        warnings.warn("an old API", UserWarning)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["request_id"] == "r1"
    assert json.loads(lines[0])["component"] == "gateway"
    warned = json.loads(lines[1])
    assert warned["logger"] == "py.warnings" and "an old API" in warned["msg"]


def test_bad_environment_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("SPLITSERVE_LOG_FORMAT", "xml")
    with pytest.raises(ValidationError, match="'text' or 'json'"):
        LogConfig()


def test_vllm_logging_config_is_loadable(tmp_path, capsys: pytest.CaptureFixture[str],
                                         root_logging: None) -> None:
    """The file vLLM loads through VLLM_LOGGING_CONFIG_PATH configures its `vllm` logger with
    our JSON formatter and static fields."""
    env = vllm_environment(LogConfig(format="json"), tmp_path / "logging.json",
                           worker_id="prefill-0-aa", role="prefill")
    assert env["VLLM_CONFIGURE_LOGGING"] == "1"
    vllm_logger = logging.getLogger("vllm")
    saved = (list(vllm_logger.handlers), vllm_logger.propagate, vllm_logger.level)
    try:
        logging.config.dictConfig(json.loads((tmp_path / "logging.json").read_text()))
        with request_id.bound("r9"):
            logging.getLogger("vllm.engine").info("step")
        rec = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert rec["logger"] == "vllm.engine" and rec["msg"] == "step"
        assert rec["worker_id"] == "prefill-0-aa" and rec["role"] == "prefill"
        assert rec["request_id"] == "r9"
    finally:
        vllm_logger.handlers, vllm_logger.propagate = saved[0], saved[1]
        vllm_logger.setLevel(saved[2])
