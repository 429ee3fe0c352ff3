"""Tests for the offline, deterministic built-in model (services/controller/builtin_model.py).

The tiny model is built once per session (through ensure_builtin_model) and shared; only the
determinism test builds a second copy. `small` is never built here: its size is checked on a
meta-device model.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from services.controller import builtin_model as bm
from services.controller.builtin_model import (
    BOS_TOKEN,
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    MARKER_FILE,
    MODEL_SPECS,
    PAD_TOKEN,
    ModelSize,
    builtin_model_dir,
    ensure_builtin_model,
    llama_config,
    make_model,
    read_marker,
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi."},
]


def _file_hashes(d: Path) -> dict[str, str]:
    """sha256 of every file in a model directory, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir whose tiny model was built once by ensure_builtin_model."""
    cache = tmp_path_factory.mktemp("cache")
    ensure_builtin_model(cache, "tiny")
    return cache


@pytest.fixture(scope="session")
def tiny_dir(tiny_cache: Path) -> Path:
    """The session's tiny model directory."""
    return builtin_model_dir(tiny_cache, "tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path) -> Any:
    """The tiny model's tokenizer, loaded the way vLLM loads it (AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


# ---------------------------------------------------------------------------------------------
# Build output
# ---------------------------------------------------------------------------------------------


def test_layout_and_marker(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        MARKER_FILE,
    } <= names
    assert "chat_template.jinja" not in names  # the template lives in tokenizer_config.json
    marker = read_marker(tiny_dir)
    assert marker is not None
    assert marker["size"] == "tiny" and marker["version"] == bm.BUILTIN_MODEL_VERSION
    assert marker["param_count"] == MODEL_SPECS["tiny"].param_count()
    hashes = _file_hashes(tiny_dir)
    assert marker["sha256"] == {
        "model.safetensors": hashes["model.safetensors"],
        "tokenizer.json": hashes["tokenizer.json"],
    }


def test_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = make_model(tmp_path / "again", "tiny")
    assert _file_hashes(again) == _file_hashes(tiny_dir)


def test_config_files(tiny_dir: Path) -> None:
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["dtype"] == "float32" and cfg["torch_dtype"] == "float32"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 1, 4)
    assert cfg["max_position_embeddings"] == 2048
    assert cfg["tie_word_embeddings"] is False
    assert cfg["vocab_size"] == 8192
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 3]  # <|end_of_text|> and <|im_end|>
    tok_cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == bm.CHAT_TEMPLATE
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == (
        BOS_TOKEN,
        EOS_TOKEN,
        PAD_TOKEN,
    )


def test_make_model_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_model(tmp_path, "tiny")
    assert (tmp_path / "x").read_text() == "keep me"


def test_unknown_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_model(tmp_path / "m", "huge")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def test_model_loads_and_runs(tiny_dir: Path, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    assert model.dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == MODEL_SPECS["tiny"].param_count()
    assert 6_500_000 <= n_params <= 8_000_000
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 8192)
    assert torch.isfinite(logits).all()


def test_greedy_generations_vary(tiny_dir: Path, tokenizer: Any) -> None:
    """The random model must not collapse into one repeated token for every prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    outputs = []
    for prompt in ("The quick brown fox", "def main():", "Hello, how are you?"):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=12)
        outputs.append(tuple(out[0, ids.shape[1] :].tolist()))
    assert len(set(outputs)) == len(outputs)
    assert all(len(set(o)) > 3 for o in outputs)


@pytest.mark.parametrize(
    ("size", "low", "high"), [("tiny", 6_500_000, 8_000_000), ("small", 100_000_000, 120_000_000)]
)
def test_param_count_meta(size: ModelSize, low: int, high: int) -> None:
    from transformers import LlamaForCausalLM

    spec = MODEL_SPECS[size]
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(spec))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == spec.param_count()
    assert low <= n_params <= high


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_special_tokens(tokenizer: Any) -> None:
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.bos_token_id == 0
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 1
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == 4
    assert tokenizer.convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN]) == [2, 3]
    assert len(tokenizer) == 8192
    assert {IM_START_TOKEN, IM_END_TOKEN} <= set(tokenizer.all_special_tokens)


def test_completion_prompt_gets_one_bos(tokenizer: Any) -> None:
    ids = tokenizer("Hello world").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert ids[1:] == tokenizer("Hello world", add_special_tokens=False).input_ids


def test_chat_template_text(tokenizer: Any) -> None:
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"{BOS_TOKEN}"
        f"{IM_START_TOKEN}system\nYou are terse.{IM_END_TOKEN}\n"
        f"{IM_START_TOKEN}user\nSay hi.{IM_END_TOKEN}\n"
        f"{IM_START_TOKEN}assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert no_prompt.startswith(BOS_TOKEN)
    assert no_prompt.endswith(f"Say hi.{IM_END_TOKEN}\n")
    assert not no_prompt.endswith(f"{IM_START_TOKEN}assistant\n")


def test_chat_template_no_doubled_bos(tokenizer: Any) -> None:
    """The template emits bos; apply_chat_template(tokenize=True) must not add another."""
    enc = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    bos = tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] == tokenizer.convert_tokens_to_ids(IM_START_TOKEN)
    assert ids.count(bos) == 1
    # Contract with the serving path (vLLM chat does the same): render, then tokenize without
    # special tokens. Tokenizing the rendered text *with* them would double bos.
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False).input_ids == ids
    assert tokenizer(text).input_ids[:2] == [bos, bos]


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii, with  double  spaces and trailing space ",
        "héllo wörld — naïve café",
        "日本語のテキスト 中文 한국어",
        "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
        "combining x\u0301 and RTL שלום مرحبا",
        "control \x00\x01\t\r\n\x7f and \u2028 separators",
        "code:\n    def f(x):\n        return x ** 2  # ok\n",
        " .  , ? leading space and punctuation that cleanup would mangle",
    ],
)
def test_unicode_round_trip(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer(text).input_ids
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text


def test_corpus_is_deterministic() -> None:
    first = bm.build_corpus()
    assert first == bm.build_corpus()
    assert sum(len(d) for d in first) > 200_000


# ---------------------------------------------------------------------------------------------
# ensure_builtin_model
# ---------------------------------------------------------------------------------------------


def _no_build(*_: object, **__: object) -> Path:
    raise AssertionError("make_model must not be called")


def _copying_builder(source: Path, calls: list[Path]) -> Any:
    """A fast stand-in for make_model that copies a finished build."""

    def build(out_dir: Path, size: ModelSize = "tiny", *, overwrite: bool = False) -> Path:
        calls.append(out_dir)
        time.sleep(0.05)  # widen race windows
        out_dir.mkdir(parents=True, exist_ok=True)
        for p in source.iterdir():
            (out_dir / p.name).write_bytes(p.read_bytes())
        return out_dir

    return build


def test_ensure_is_idempotent(tiny_cache: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _file_hashes(tiny_dir)
    monkeypatch.setattr(bm, "make_model", _no_build)
    assert ensure_builtin_model(tiny_cache, "tiny") == tiny_dir
    assert _file_hashes(tiny_dir) == before
    assert tiny_dir == tiny_cache / "models" / "builtin-tiny-v1"


def test_ensure_ignores_leftover_temp_dirs(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    fresh = models / ".tmp-builtin-tiny-v1-crashed"
    fresh.mkdir(parents=True)
    (fresh / "model.safetensors").write_bytes(b"half")
    stale = models / ".tmp-builtin-tiny-v1-old"
    stale.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    calls: list[Path] = []
    monkeypatch.setattr(bm, "make_model", _copying_builder(tiny_dir, calls))

    target = ensure_builtin_model(tmp_path, "tiny")
    assert target == models / "builtin-tiny-v1"
    assert len(calls) == 1 and calls[0].parent == models and calls[0] != fresh
    assert _file_hashes(target) == _file_hashes(tiny_dir)
    assert not stale.exists()  # swept: over an hour old
    assert not calls[0].exists()  # our own temp dir was renamed into place
    monkeypatch.setattr(bm, "make_model", _no_build)
    assert ensure_builtin_model(tmp_path, "tiny") == target


def test_ensure_crash_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(out_dir: Path, size: ModelSize = "tiny", *, overwrite: bool = False) -> Path:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(bm, "make_model", crash)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_builtin_model(tmp_path, "tiny")
    models = tmp_path / "models"
    assert not (models / "builtin-tiny-v1").exists()
    assert not [p for p in models.iterdir() if p.name.startswith(".tmp-")]


def test_ensure_rebuilds_unfinished_target(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = builtin_model_dir(tmp_path, "tiny")
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no marker: not a finished build
    calls: list[Path] = []
    monkeypatch.setattr(bm, "make_model", _copying_builder(tiny_dir, calls))
    assert ensure_builtin_model(tmp_path, "tiny") == target
    assert len(calls) == 1
    assert read_marker(target) is not None


def test_ensure_concurrent_callers_build_once(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(bm, "make_model", _copying_builder(tiny_dir, calls))
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_builtin_model(tmp_path, "tiny"))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [builtin_model_dir(tmp_path, "tiny")] * 4
    assert len(calls) == 1
