"""Built-in test model: an offline, deterministic, HuggingFace-format Llama directory.

splitserve needs a model that every machine can serve without downloading anything: CI,
laptops and air-gapped clusters alike. This module builds one from nothing but the local
Python installation:

* **Tokenizer.** A byte-level BPE (GPT-2 style pre-tokenizer, 8192 entries) trained with
  the ``tokenizers`` library on a corpus made of the docstrings of a fixed, sorted list of
  standard-library modules (:data:`CORPUS_MODULES`). Byte-level BPE has all 256 bytes in its
  alphabet, so any Unicode text round-trips exactly. The five special tokens come first
  (ids 0-4): ``<|begin_of_text|>`` (bos), ``<|end_of_text|>`` (eos), ``<|im_start|>``,
  ``<|im_end|>`` and ``<|pad|>``.
* **Bos handling.** ``tokenizer(text)`` (``add_special_tokens=True``, what completions use)
  prepends bos through the tokenizer's post-processor. The ChatML chat template emits
  ``bos_token`` itself as its first token; transformers' ``apply_chat_template(tokenize=True)``
  and vLLM's chat path both tokenize the rendered template with ``add_special_tokens=False``,
  so a chat prompt starts with exactly one bos.
* **Model.** A ``LlamaForCausalLM`` with float32 weights drawn from a fixed-seed
  ``torch.Generator`` in parameter-name order (independent of transformers' own
  initialisation code), saved as ``model.safetensors``. The init std
  (:attr:`ModelSpec.initializer_range`, 0.1) is larger than the usual 0.02 so that the
  logits of this random model are spread widely: greedy decoding then has clear winners,
  which keeps outputs identical across attention/matmul implementations (vLLM vs
  transformers), and generations vary across prompts instead of all collapsing into one
  repeated token.

Every build with the same code, library versions and Python installation produces the same
bytes. :func:`ensure_builtin_model` caches the result under
``<cache_dir>/models/builtin-<size>-v1`` and creates it atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import inspect
import json
import os
import shutil
import tempfile
import time
import types
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

__all__ = [
    "BOS_TOKEN",
    "BUILTIN_MODEL_VERSION",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "MARKER_FILE",
    "MODEL_SPECS",
    "PAD_TOKEN",
    "ModelSize",
    "ModelSpec",
    "build_corpus",
    "builtin_model_dir",
    "ensure_builtin_model",
    "llama_config",
    "make_model",
    "read_marker",
]

ModelSize = Literal["tiny", "small"]
"""Names of the built-in model sizes."""

BUILTIN_MODEL_VERSION: Final = 1
"""Recipe version; part of the cache directory name, bump it whenever the output changes."""

MARKER_FILE: Final = "splitserve-model.json"
"""File written last into a finished model directory; describes the build."""

BOS_TOKEN: Final = "<|begin_of_text|>"
"""Beginning-of-sequence token (id 0)."""
EOS_TOKEN: Final = "<|end_of_text|>"
"""End-of-sequence token (id 1)."""
IM_START_TOKEN: Final = "<|im_start|>"
"""ChatML message-start token (id 2)."""
IM_END_TOKEN: Final = "<|im_end|>"
"""ChatML message-end token (id 3); also a stop token in generation_config.json."""
PAD_TOKEN: Final = "<|pad|>"
"""Padding token (id 4)."""

SPECIAL_TOKENS: Final[tuple[str, ...]] = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)
"""Special tokens in id order; they occupy ids 0..4 of the vocabulary."""

CHAT_TEMPLATE: Final = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)
"""ChatML chat template (Jinja); emits bos first, honours ``add_generation_prompt``."""

CORPUS_MODULES: Final[tuple[str, ...]] = tuple(
    sorted(
        (
            "abc", "argparse", "ast", "asyncio", "base64", "bisect", "builtins", "calendar",
            "collections", "configparser", "contextlib", "copy", "csv", "dataclasses",
            "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "ftplib",
            "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
            "html.parser", "http.client", "http.server", "imaplib", "importlib", "inspect", "io",
            "ipaddress", "itertools", "json", "locale", "logging", "logging.handlers", "mailbox",
            "math", "mimetypes", "multiprocessing", "numbers", "operator", "optparse", "os",
            "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
            "pydoc", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex",
            "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl",
            "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
            "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
            "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
            "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
        )
    )
)
"""Standard-library modules whose docstrings form the tokenizer's training corpus."""

VOCAB_SIZE: Final = 8192
"""Tokenizer and embedding vocabulary size."""

_TMP_PREFIX: Final = ".tmp-"
_STALE_TMP_SECONDS: Final = 3600.0


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and initialisation of one built-in model size."""

    size: ModelSize
    """Name of this size."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int
    """Number of decoder layers."""
    num_attention_heads: int
    """Number of query heads."""
    num_key_value_heads: int
    """Number of key/value heads (grouped-query attention)."""
    vocab_size: int = VOCAB_SIZE
    """Vocabulary size; equals the trained tokenizer's size."""
    max_position_embeddings: int = 2048
    """Longest supported sequence (prompt plus generation)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-5
    """Epsilon of the RMSNorm layers."""
    initializer_range: float = 0.1
    """Std of the normal init of every matrix; larger than 0.02 for clear greedy winners."""
    seed: int = 1234
    """Seed of the torch generator that draws the weights."""

    @property
    def head_dim(self) -> int:
        """Per-head dimension (hidden_size / num_attention_heads)."""
        return self.hidden_size // self.num_attention_heads

    def param_count(self) -> int:
        """Number of parameters, computed analytically (untied embeddings, no biases)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        attn = h * h * 2 + h * kv * 2  # q, o + k, v
        mlp = 3 * h * i  # gate, up, down
        per_layer = attn + mlp + 2 * h  # + input/post-attention RMSNorm
        return 2 * v * h + self.num_hidden_layers * per_layer + h  # embed + lm_head + final norm


MODEL_SPECS: Final[dict[ModelSize, ModelSpec]] = {
    "tiny": ModelSpec(
        size="tiny",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
    "small": ModelSpec(
        size="small",
        hidden_size=768,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
    ),
}
"""The spec of each built-in size: tiny is about 7.2M parameters, small about 109M."""


# --------------------------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------------------------


def _member_docs(module: types.ModuleType) -> Iterator[str | None]:
    """Yield the docstrings of a module, its own classes/functions and their methods."""
    yield inspect.getdoc(module)
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield inspect.getdoc(obj)
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member) or isinstance(
                    member, (property, classmethod, staticmethod)
                ) or inspect.ismethoddescriptor(member):
                    yield inspect.getdoc(member)


def build_corpus() -> list[str]:
    """Return the tokenizer training corpus: unique stdlib docstrings in a fixed order."""
    seen: set[str] = set()
    docs: list[str] = []
    with warnings.catch_warnings():  # importing/inspecting deprecated members warns
        warnings.simplefilter("ignore")
        for name in CORPUS_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # e.g. a Python built without sqlite3/ssl: same every run
                continue
            for doc in _member_docs(module):
                if doc and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return docs


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train the byte-level BPE ``tokenizers.Tokenizer`` on :func:`build_corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer training produced {tok.get_vocab_size()} tokens, wanted {vocab_size}"
        )
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return tok


def _save_tokenizer(out_dir: Path, spec: ModelSpec) -> dict[str, int]:
    """Train and save the tokenizer into ``out_dir``; return the special token ids."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(spec.vocab_size),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tok.save_pretrained(str(out_dir), save_jinja_files=False)
    # Write the config in the classic form that transformers 4.x and 5.x both read: 5.x saves
    # its own class name ("TokenizersBackend") and a list-valued "extra_special_tokens", which
    # 4.x does not know. Also write the classic special_tokens_map.json.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("backend", None)
    cfg.pop("extra_special_tokens", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["additional_special_tokens"] = [IM_START_TOKEN, IM_END_TOKEN]
    _write_json(cfg_path, cfg)
    _write_json(
        out_dir / "special_tokens_map.json",
        {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
        },
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if list(ids.values()) != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"unexpected special token ids: {ids}")
    return ids


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def llama_config(spec: ModelSpec) -> LlamaConfig:
    """Return the ``LlamaConfig`` for a spec (bos/eos/pad ids are the tokenizer's 0/1/4)."""
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        hidden_act="silu",
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        initializer_range=spec.initializer_range,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        use_cache=True,
    )
    config.dtype = torch.float32
    config.architectures = ["LlamaForCausalLM"]
    return config


def _init_weights(model: LlamaForCausalLM, spec: ModelSpec) -> None:
    """Overwrite every parameter from a seeded generator: N(0, std) matrices, unit norms."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    with torch.no_grad():
        params = sorted(model.named_parameters(), key=lambda kv: kv[0])
        for _, param in params:
            if param.ndim == 1:  # RMSNorm weights
                param.fill_(1.0)
            else:
                param.copy_(
                    torch.randn(param.shape, generator=gen, dtype=torch.float32)
                    * spec.initializer_range
                )


def _save_model(out_dir: Path, spec: ModelSpec) -> int:
    """Build, initialise and save the model and its generation config; return #params."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    config = llama_config(spec)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.float32)
    _init_weights(model, spec)
    # Non-persistent buffers (RoPE inv_freq) were created on meta: recompute them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=[SPECIAL_TOKENS.index(EOS_TOKEN), SPECIAL_TOKENS.index(IM_END_TOKEN)],
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != spec.param_count():
        raise RuntimeError(f"model has {n_params} parameters, spec says {spec.param_count()}")
    # transformers 5 writes "dtype"; older readers look for "torch_dtype": write both.
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["dtype"] = "float32"
    cfg["torch_dtype"] = "float32"
    _write_json(cfg_path, cfg)
    return n_params


def _write_json(path: Path, data: dict[str, object]) -> None:
    """Write ``data`` as stable, sorted, indented JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _fix_permissions(out_dir: Path) -> None:
    """Make the build world-readable (mkdtemp and safetensors create 0700/0600 entries)."""
    os.chmod(out_dir, 0o755)
    for path in out_dir.iterdir():
        if path.is_file():
            os.chmod(path, 0o644)


def make_model(out_dir: Path, size: ModelSize = "tiny", *, overwrite: bool = False) -> Path:
    """Build the built-in model of ``size`` into ``out_dir`` (not atomic); return ``out_dir``.

    ``out_dir`` must not exist or be empty unless ``overwrite`` is set, in which case it is
    removed first. The marker file :data:`MARKER_FILE` is written last.
    """
    if size not in MODEL_SPECS:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(MODEL_SPECS)}")
    spec = MODEL_SPECS[size]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    special_ids = _save_tokenizer(out_dir, spec)
    n_params = _save_model(out_dir, spec)
    marker = {
        "name": f"builtin-{size}-v{BUILTIN_MODEL_VERSION}",
        "version": BUILTIN_MODEL_VERSION,
        "size": size,
        "seed": spec.seed,
        "param_count": n_params,
        "spec": asdict(spec),
        "special_tokens": special_ids,
        "sha256": {
            name: _sha256(out_dir / name) for name in ("model.safetensors", "tokenizer.json")
        },
    }
    _fix_permissions(out_dir)
    _write_json(out_dir / MARKER_FILE, marker)
    return out_dir


def read_marker(model_dir: Path) -> dict[str, object] | None:
    """Return the parsed marker of a finished built-in model directory, or None."""
    try:
        data = json.loads((Path(model_dir) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def builtin_model_dir(cache_dir: Path, size: ModelSize = "tiny") -> Path:
    """Return where :func:`ensure_builtin_model` keeps the model of ``size``."""
    return Path(cache_dir) / "models" / f"builtin-{size}-v{BUILTIN_MODEL_VERSION}"


def _is_complete(model_dir: Path, size: ModelSize) -> bool:
    """True if ``model_dir`` holds a finished build of ``size`` at the current version."""
    marker = read_marker(model_dir)
    return (
        marker is not None
        and marker.get("size") == size
        and marker.get("version") == BUILTIN_MODEL_VERSION
    )


@contextlib.contextmanager
def _build_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock so racing processes build only once."""
    with lock_path.open("a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _sweep_stale_tmp(models_dir: Path, target_name: str) -> None:
    """Remove temp build dirs of ``target_name`` left behind by crashed builds over an hour ago."""
    now = time.time()
    for entry in models_dir.glob(f"{_TMP_PREFIX}{target_name}-*"):
        try:
            if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def ensure_builtin_model(cache_dir: Path, size: ModelSize = "tiny") -> Path:
    """Return <cache_dir>/models/builtin-<size>-v1, creating it on first use.

    The model is built in a temp dir beside the target and renamed into place, so a crash
    never leaves a half-written model; an advisory file lock serialises concurrent builders,
    and the rename alone keeps racing processes safe where locks don't work.
    """
    target = builtin_model_dir(cache_dir, size)
    if _is_complete(target, size):
        return target
    models_dir = target.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(models_dir / f".{target.name}.lock"):
        if _is_complete(target, size):  # another process finished while we waited
            return target
        _sweep_stale_tmp(models_dir, target.name)
        if target.exists():  # present but unfinished/foreign: move it aside, then rebuild
            trash = models_dir / f"{_TMP_PREFIX}{target.name}-broken-{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=models_dir))
        try:
            make_model(tmp, size)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_complete(target, size):  # lost a lock-free race to a good copy? fine
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
