"""vLLM engine arguments passed through to the engines untouched, validated by vLLM's own
argument parser (the one `vllm serve` uses).

An operator gives engine arguments as a map of vLLM's names (`max_num_batched_tokens` or
`max-num-batched-tokens`) to values: shared by every pool, and per pool. Each value is turned
into the command-line tokens `vllm serve` would take and parsed by vLLM's parser, so a value
means exactly what it means to vLLM, and a wrong one is refused with vLLM's own message before
anything starts. The worker parses the same map again with the same code and hands the result
to `AsyncEngineArgs`.

What prefill/decode correctness needs stays owned by splitserve: the KV connector and event
publisher, the block size and hash algorithm the router hashes with, the model; those keys are
refused, with the setting to use instead. Keys that must be equal on every engine of a cluster
(the model's weights and dtypes: prefill's KV must be decode's KV) may be set for all pools but
not for one.

vLLM is imported on first use.
"""

from __future__ import annotations

import argparse
import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

OWNED: dict[str, str] = {
    "model": "use --model (the gateway tokenizes with the same model directory)",
    "tokenizer": "the tokenizer is the model's (the gateway must tokenize identically)",
    "served_model_name": "use --served-model-name",
    "kv_transfer_config": "splitserve configures the KV connector of each role (prefill "
                          "produces, decode consumes)",
    "kv_events_config": "splitserve's router index is fed by each engine's KV-event publisher",
    "block_size": "use --block-size (the router hashes prompts in blocks of the engines' size)",
    "prefix_caching_hash_algo": "the router hashes blocks with the engines' algorithm "
                                "(EngineConfig.prefix_caching_hash_algo)",
    "max_model_len": "use --max-model-len (the gateway enforces the same context length)",
    "dtype": "use --dtype (every engine of a cluster must compute the same KV)",
    "tensor_parallel_size": "use --tensor-parallel-size (the controller reserves that many "
                            "GPUs per worker)",
    "pipeline_parallel_size": "use --pipeline-parallel-size (the controller reserves GPUs "
                              "per worker)",
    "data_parallel_size": "one worker is one engine: run more workers instead (--prefill, "
                          "--decode, --workers)",
    "disable_log_stats": "a worker's load and health come from the engine's step statistics",
}
"""Engine arguments splitserve sets itself, with what to use instead."""

_SAME_KV = "prefill's KV cache must be exactly what decode would have computed"
_SAME_FRONT = "the gateway's front end checks and finishes requests with the same settings"
SAME_IN_EVERY_POOL: dict[str, str] = {
    **{key: _SAME_KV for key in ("revision", "code_revision", "tokenizer_revision",
                                 "quantization", "kv_cache_dtype", "hf_overrides",
                                 "trust_remote_code", "load_format", "seed")},
    **{key: _SAME_FRONT for key in ("max_logprobs", "logprobs_mode", "generation_config",
                                    "override_generation_config", "tokenizer_mode",
                                    "structured_outputs_config")},
}
"""Engine arguments that every engine of a cluster must share: allowed in the shared map,
refused in one pool's."""

POOLS = ("prefill", "decode", "both")


class EngineArgsError(ValueError):
    """An engine argument that vLLM's parser or splitserve refuses; the message names it."""


def dest(key: str) -> str:
    """vLLM's attribute name of an argument given as `max-num-seqs`, `--max-num-seqs` or
    `max_num_seqs`."""
    return key.strip().lstrip("-").replace("-", "_")


def parse_assignments(items: list[str] | None, where: str) -> dict[str, str]:
    """`KEY=VALUE` strings (repeatable command-line flags) as a map; later ones win."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EngineArgsError(f"{where} {item!r}: expected KEY=VALUE, e.g. "
                                  "max_num_batched_tokens=4096")
        out[dest(key)] = value
    return out


def check_overrides(shared: Mapping[str, Any], per_pool: Mapping[str, Mapping[str, Any]]
                    ) -> None:
    """Refuse what would break prefill/decode correctness: keys splitserve owns, anywhere, and
    keys every engine must share, in one pool's map."""
    maps = [("engine_args", shared)] + [(f"{pool} engine_args", args)
                                        for pool, args in per_pool.items()]
    for where, args in maps:
        for key in args:
            if (why := OWNED.get(dest(key))) is not None:
                raise EngineArgsError(f"{where}: `{key}` is set by splitserve: {why}")
    for pool, args in per_pool.items():
        if pool not in POOLS:
            raise EngineArgsError(f"unknown pool {pool!r} for engine arguments; pools: "
                                  + ", ".join(POOLS))
        for key in args:
            if (why := SAME_IN_EVERY_POOL.get(dest(key))) is not None:
                raise EngineArgsError(
                    f"{pool} engine_args: `{key}` must be the same on every engine ({why}); "
                    "set it in the shared engine_args (--engine-arg) instead")


def merged(shared: Mapping[str, Any], pool: Mapping[str, Any]) -> dict[str, Any]:
    """One pool's engine arguments: the shared map, then the pool's own on top (by vLLM
    name, so `max-num-seqs` in one and `max_num_seqs` in the other are one key)."""
    out = {dest(k): v for k, v in shared.items()}
    out.update({dest(k): v for k, v in pool.items()})
    return out


def parse(args: Mapping[str, Any], where: str = "engine_args",
          parser: "FlexibleArgumentParser | None" = None) -> dict[str, Any]:
    """Each argument parsed by vLLM's own parser (the engine's, or `parser`): {vLLM attribute
    name: value as vLLM parses it}, for `AsyncEngineArgs(**...)`. Raises EngineArgsError
    naming the first bad one."""
    parser = parser or engine_parser()
    out: dict[str, Any] = {}
    for key, value in args.items():
        name = dest(key)
        action = parser._option_string_actions.get("--" + name.replace("_", "-"))
        if action is None or action.dest != name:
            raise EngineArgsError(f"{where}: `{key}` is not a vLLM argument here (see "
                                  "`python -m vllm.entrypoints.openai.api_server --help`)")
        try:
            ns = parser.parse_args(_tokens(action, value))
        except ParseError as exc:
            raise EngineArgsError(f"{where}: `{key}`={value!r}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise EngineArgsError(f"{where}: `{key}`={value!r}: {exc}") from None
        out[name] = getattr(ns, name)
    return out


def cli_tokens(args: Mapping[str, Any], parser: "FlexibleArgumentParser | None" = None
               ) -> list[str]:
    """The same arguments as `vllm serve` command-line tokens (for vLLM's own server in
    benchmarks: it gets exactly what the workers get). Raises EngineArgsError for one that
    is not an argument of `parser` (default: the engine's)."""
    parser = parser or engine_parser()
    tokens: list[str] = []
    for key, value in args.items():
        action = parser._option_string_actions.get("--" + dest(key).replace("_", "-"))
        if action is None:
            raise EngineArgsError(f"`{key}` is not a vLLM argument here")
        tokens += _tokens(action, value)
    return tokens


class ParseError(EngineArgsError):
    """vLLM's parser refused the command line (argparse's error, raised instead of exiting)."""


def _tokens(action: argparse.Action, value: Any) -> list[str]:
    option = "--" + action.dest.replace("_", "-")
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        flag = _boolean(value)
        if flag:
            return [option]
        negative = "--no-" + option[2:]
        if negative not in action.option_strings:
            raise EngineArgsError(f"`{action.dest}` can only be switched on")
        return [negative]
    if action.nargs in ("+", "*") and isinstance(value, (list, tuple)):
        return [option, *(_scalar(v) for v in value)]
    if isinstance(action, argparse._AppendAction) and isinstance(value, (list, tuple)):
        return [t for v in value for t in (option, _scalar(v))]  # repeated: --middleware X
    return [option, _scalar(value)]


def _scalar(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", ""):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise EngineArgsError(f"expected true or false, got {value!r}")


def _raising_parser() -> "FlexibleArgumentParser":
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise ParseError(message)

    return Parser(add_help=False)


@lru_cache(maxsize=1)
def engine_parser() -> "FlexibleArgumentParser":
    """vLLM's parser of engine arguments (`AsyncEngineArgs`), raising ParseError."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    parser = _raising_parser()
    AsyncEngineArgs.add_cli_args(parser)
    return parser


@lru_cache(maxsize=1)
def server_parser() -> "FlexibleArgumentParser":
    """vLLM's OpenAI server parser (`vllm serve`: engine and front-end settings), raising
    ParseError."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser

    return make_arg_parser(_raising_parser())
