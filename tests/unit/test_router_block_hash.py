"""router.block_hash must reproduce vLLM's own prefix-cache block hashes exactly.

vLLM is imported here (and only here) as the reference: its ``get_request_block_hasher`` runs on
real ``Request`` objects and its ``maybe_convert_block_hash`` gives the published form.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from router.block_hash import (
    DEFAULT_NONE_HASH_SEED,
    BlockHasher,
    HashSeedError,
    cbor_dumps,
    external_block_hash,
)

import vllm.v1.core.kv_cache_utils as vllm_kv  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

ALGORITHMS = ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]  # xxhash: a test extra


def _random_tokens(rng: random.Random, n: int) -> list[int]:
    """Token ids spanning every pickle/CBOR int width (1, 2, 4 byte and larger)."""
    pools = [(0, 23), (24, 255), (256, 65_535), (65_536, 262_143), (2**31, 2**31 + 10)]
    out = []
    for _ in range(n):
        lo, hi = pools[rng.choices(range(len(pools)), weights=[5, 20, 60, 14, 1])[0]]
        out.append(rng.randint(lo, hi))
    return out


def _vllm_hashes(
    algorithm: str, block_size: int, tokens: list[int], lora: tuple[str, str] | None = None, salt: str | None = None
) -> list[int]:
    """The hashes vLLM computes for ``tokens`` and publishes in BlockStored events."""
    hash_fn = get_hash_fn_by_name(algorithm)
    vllm_kv.init_none_hash(hash_fn)
    hasher = vllm_kv.get_request_block_hasher(block_size, hash_fn)
    lora_req = LoRARequest(lora_name=lora[0], lora_int_id=1, lora_path=lora[1]) if lora else None
    req = Request(
        request_id="r",
        prompt_token_ids=tokens,
        sampling_params=SamplingParams(max_tokens=1),
        pooling_params=None,
        lora_request=lora_req,
        cache_salt=salt,
        block_hasher=hasher,
    )
    return [vllm_kv.maybe_convert_block_hash(h) for h in req.block_hashes]


@pytest.fixture
def seed_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Set/unset PYTHONHASHSEED for both vLLM's init_none_hash and BlockHasher."""

    def set_seed(seed: str | None) -> None:
        if seed is None:
            monkeypatch.delenv("PYTHONHASHSEED", raising=False)
        else:
            monkeypatch.setenv("PYTHONHASHSEED", seed)

    yield set_seed


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("seed", ["0", "12345"])
def test_matches_vllm_random_sequences(algorithm: str, seed: str, seed_env: Any) -> None:
    seed_env(seed)
    rng = random.Random(f"{algorithm}-{seed}")
    compared = 0
    for block_size in (1, 2, 3, 16, 32, 128):
        hasher = BlockHasher(block_size, algorithm)
        for _ in range(12):
            tokens = _random_tokens(rng, rng.randint(0, 600))
            expected = _vllm_hashes(algorithm, block_size, tokens)
            got = hasher.block_hashes(tokens)
            assert got == expected, (algorithm, block_size, len(tokens))
            assert len(got) == len(tokens) // block_size  # only full blocks
            compared += len(got)
    assert compared > 1000


@pytest.mark.parametrize("algorithm", ["sha256", "sha256_cbor"])
def test_unset_seed_uses_vllm_default(algorithm: str, seed_env: Any) -> None:
    seed_env(None)
    hasher = BlockHasher(16, algorithm)
    assert hasher.hash_seed == DEFAULT_NONE_HASH_SEED
    tokens = _random_tokens(random.Random(1), 100)
    assert hasher.block_hashes(tokens) == _vllm_hashes(algorithm, 16, tokens)


def test_explicit_seed_overrides_environment(seed_env: Any) -> None:
    seed_env("7")
    tokens = list(range(64))
    expected = _vllm_hashes("sha256", 16, tokens)
    seed_env("999")
    assert BlockHasher(16, "sha256", hash_seed="7").block_hashes(tokens) == expected
    assert BlockHasher(16, "sha256").block_hashes(tokens) != expected


@pytest.mark.parametrize("algorithm", ["xxhash", "xxhash_cbor"])
def test_xxhash_without_seed_is_refused(algorithm: str, seed_env: Any) -> None:
    seed_env(None)
    with pytest.raises(HashSeedError, match="PYTHONHASHSEED"):
        BlockHasher(16, algorithm)
    BlockHasher(16, algorithm, hash_seed="0")  # an explicit seed is fine


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_lora_and_cache_salt_extra_keys(algorithm: str, seed_env: Any) -> None:
    seed_env("0")
    rng = random.Random(3)
    hasher = BlockHasher(16, algorithm)
    for lora, salt in [(("adapter-a", "/loras/a"), None), (None, "tenant-42"), (("b", "/loras/b"), "s")]:
        tokens = _random_tokens(rng, 200)
        expected = _vllm_hashes(algorithm, 16, tokens, lora=lora, salt=salt)
        assert hasher.block_hashes(tokens, lora=lora, cache_salt=salt) == expected
        assert expected != hasher.block_hashes(tokens)  # the keys do change the hashes


def test_prefix_property_and_chaining(seed_env: Any) -> None:
    seed_env("0")
    hasher = BlockHasher(16)
    tokens = list(range(100, 260))
    full = hasher.block_hashes(tokens)
    assert hasher.block_hashes(tokens[:50]) == full[:3]
    changed = list(tokens)
    changed[20] += 1  # block 1 changes, so every later hash changes too (chaining)
    other = hasher.block_hashes(changed)
    assert other[0] == full[0] and all(a != b for a, b in zip(other[1:], full[1:]))
    digests = hasher.block_digests(tokens)
    assert [external_block_hash(d) for d in digests] == full
    assert hasher.block_digests(tokens[48:], parent=digests[2]) == digests[3:]


def test_token_container_types(seed_env: Any) -> None:
    seed_env("0")
    import numpy as np
    hasher = BlockHasher(16)
    tokens = list(range(300, 364))
    expected = hasher.block_hashes(tokens)
    assert hasher.block_hashes(tuple(tokens)) == expected
    assert hasher.block_hashes(np.array(tokens, dtype=np.int64)) == expected
    assert hasher.block_hashes([np.int64(t) for t in tokens]) == expected
    assert hasher.block_hashes(range(300, 364)) == expected


def test_cbor_matches_cbor2() -> None:
    import cbor2
    rng = random.Random(5)
    samples: list[Any] = [None, True, False, 0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1,
                          -1, -24, -25, -256, -257, -(2**63), b"", b"x" * 23, b"y" * 300, "", "é", "z" * 70_000,
                          (), [], ((b"a", (1, 2, 3), None),), ("lora", "name", "/path")]
    samples += [(rng.randbytes(32), tuple(_random_tokens(rng, 16)), None) for _ in range(50)]
    for obj in samples:
        assert cbor_dumps(obj) == cbor2.dumps(obj, canonical=True), obj


def test_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        BlockHasher(0)
    with pytest.raises(ValueError, match="unsupported"):
        BlockHasher(16, "md5")


def test_lazy_and_cached_hashes_are_the_same_hashes() -> None:
    import random as _random

    rng = _random.Random(18)
    for algo in ("sha256", "sha256_cbor"):
        plain = BlockHasher(16, algo, hash_seed="0")
        cached = BlockHasher(16, algo, hash_seed="0", cache_size=8)
        for _ in range(30):
            toks = [rng.randrange(150_000) for _ in range(rng.randrange(0, 200))]
            for kw in ({}, {"cache_salt": "s"}, {"lora": ("a", "/p")}):
                want = plain.block_hashes(toks, **kw)
                assert list(plain.iter_block_hashes(toks, **kw)) == want
                assert cached.block_hashes(toks, **kw) == want
                assert list(cached.iter_block_hashes(toks, **kw)) == want  # now from the cache
        if cached._cache is not None:
            assert len(cached._cache) <= 8  # bounded: oldest forgotten first
    hashes = BlockHasher(16, "sha256", hash_seed="0").iter_block_hashes(list(range(64)))
    assert next(hashes) == BlockHasher(16, "sha256", hash_seed="0").block_hashes(list(range(16)))[0]


def test_a_full_cache_forgets_its_oldest_entries_a_sixteenth_at_a_time() -> None:
    import random as _random

    rng = _random.Random(3)
    plain = BlockHasher(16, "sha256", hash_seed="0")
    cached = BlockHasher(16, "sha256", hash_seed="0", cache_size=64)
    prompts = [[rng.randrange(150_000) for _ in range(16 * 8)] for _ in range(20)]
    for toks in prompts:  # 160 blocks through a cache of 64
        assert list(cached.iter_block_hashes(toks)) == plain.block_hashes(toks)
        assert cached._cache is not None and len(cached._cache) <= 64
    assert len(cached._cache) >= 64 - 64 // 16
    first = (cached.none_hash, tuple(prompts[0][:16]))
    assert first not in cached._cache  # the oldest went first
    assert cached.block_digests(prompts[-1]) == plain.block_digests(prompts[-1])
    last = plain.block_digests(prompts[-1])
    assert (last[-2], tuple(prompts[-1][-16:])) in cached._cache  # the newest stayed


def test_a_prompt_seen_again_is_remembered_whole_within_the_cache_size() -> None:
    rng = random.Random(4)
    plain = BlockHasher(16, "sha256", hash_seed="0")
    cached = BlockHasher(16, "sha256", hash_seed="0", cache_size=40)
    prompts = [[rng.randrange(150_000) for _ in range(16 * rng.randrange(0, 12) + rng.randrange(16))]
               for _ in range(30)]
    for toks in prompts * 2 + [prompts[3] + [7]]:  # again; with another partial last block
        got = cached.block_hashes(toks)
        assert got == plain.block_hashes(toks)
        got.append(0)  # the caller's own list
        assert sum(map(len, cached._prompts.values())) <= 40  # bounded, oldest forgotten first
    last = list(range(40))  # two full blocks and a partial one: remembered by the full ones
    want = plain.block_hashes(last)
    assert cached.block_hashes(last) == want and len(want) == 2
    assert cached._prompts[struct.pack("32q", *last[:32])] == tuple(want)
    assert cached.block_hashes(last[:32] + [9]) == want  # one lookup
