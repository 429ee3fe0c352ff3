"""`splitserve up --config FILE`: a YAML file of the same settings as `up`'s flags, plus vLLM
engine arguments shared by every pool and per pool.

    mode: disaggregated          # any `up` flag, by its name (dashes or underscores)
    max_model_len: 2048
    engine_args:                 # vLLM engine arguments for every pool
      max_num_batched_tokens: 2048
    prefill:                     # a pool: its size, Ray resources, its own engine arguments
      replicas: 1
      engine_args: {enable_chunked_prefill: true}
    decode:
      replicas: 1
      engine_args: {max_num_seqs: 128}
    both:                        # the aggregated pool (--workers)
      replicas: 2

Flags given on the command line win over the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

POOL_FLAGS = {"prefill": ("prefill", "prefill_resources"),
              "decode": ("decode", "decode_resources"),
              "both": ("workers", "workers_resources")}
"""Pool section -> the `up` flags (replicas, Ray resources) it stands for."""


class PoolSection(BaseModel):
    """One pool in the file."""

    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(None, ge=0, description="workers of this pool")
    resources: dict[str, float] | None = Field(None, description="custom Ray resources per worker")
    engine_args: dict[str, Any] = Field(default_factory=dict, description=(
        "vLLM engine arguments of this pool's engines, on top of the shared ones"))


class UpFile(BaseModel):
    """What a config file holds, split by where it goes."""

    flags: dict[str, Any] = Field(default_factory=dict, description="`up` flag defaults")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="every pool")
    pool_engine_args: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                        description="per pool")


class UpFileError(ValueError):
    """A config file that cannot be used; the message says where and why."""


def load(path: Path, flag_names: set[str]) -> UpFile:
    """Read and check a config file against the `up` flags (`flag_names`, argparse dests)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise UpFileError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UpFileError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UpFileError(f"{path}: expected a mapping of settings at the top level")
    out = UpFile()
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key == "engine_args":
            out.engine_args = _mapping(value, f"{path}: engine_args")
        elif key in POOL_FLAGS:
            replicas_flag, resources_flag = POOL_FLAGS[key]
            if isinstance(value, int) and not isinstance(value, bool):
                value = {"replicas": value}
            try:
                section = PoolSection.model_validate(value)
            except ValidationError as exc:
                raise UpFileError(f"{path}: pool {key}: {_first_error(exc)}") from None
            if section.replicas is not None:
                out.flags[replicas_flag] = section.replicas
            if section.resources is not None:
                out.flags[resources_flag] = section.resources
            if section.engine_args:
                out.pool_engine_args[key] = section.engine_args
        elif key in flag_names and key != "config":
            out.flags[key] = value
        else:
            raise UpFileError(f"{path}: unknown setting `{raw_key}` (the settings are "
                              "`splitserve up`'s flags, engine_args, prefill, decode, both)")
    return out


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UpFileError(f"{where}: expected a mapping of vLLM argument -> value")
    return {str(k): v for k, v in value.items()}


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]
