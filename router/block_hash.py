"""Prefix-cache block hashing, bit-for-bit identical to vLLM 0.32.

vLLM identifies every *full* KV-cache block by a chained hash::

    h_0 = H((NONE_HASH, tuple(tokens[0:B]), extra_keys_0))
    h_i = H((h_{i-1},   tuple(tokens[i*B:(i+1)*B]), extra_keys_i))

where ``H`` is the configured ``prefix_caching_hash_algo`` (``vllm/utils/hashing.py``):

* ``sha256``       SHA-256 over ``pickle.dumps(obj, protocol=HIGHEST_PROTOCOL)`` (vLLM default)
* ``sha256_cbor``  SHA-256 over canonical CBOR (language independent)
* ``xxhash``       XXH3-128 over pickle (needs the optional ``xxhash`` package)
* ``xxhash_cbor``  XXH3-128 over canonical CBOR

and ``NONE_HASH = H(seed)`` with ``seed = $PYTHONHASHSEED`` when set, else the fixed string
``"vllm-none-hash"`` for the SHA-256 algorithms, else (xxhash without PYTHONHASHSEED) random bytes
drawn per engine process -- such engines can never be matched by a router, so this module refuses
that configuration.

The engine publishes each hash in its KV events (``BlockStored.block_hashes``) as
``int.from_bytes(digest, "big") & (2**64 - 1)`` (``maybe_convert_block_hash``, on by default via
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``), i.e. the low 64 bits of the digest.
:meth:`BlockHasher.block_hashes` returns exactly that form; the full digests (needed to chain)
stay internal.

Supported extra keys: a LoRA adapter (``("lora", lora_name, lora_path)`` on every block) and a
``cache_salt`` (``("cache_salt", salt)`` on the first block only), in vLLM's order. Multimodal
inputs and prompt embeddings are NOT supported (their per-block keys depend on processor outputs
the router does not have). Only single-KV-cache-group models are covered, where vLLM's
``hash_block_size`` equals the engine's ``block_size`` (hybrid models with several groups may hash
at a finer ``prefix_match_unit``; pass that as ``block_size`` then).

This module deliberately does not import vLLM: the gateway must run without it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import struct
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any, Final

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NONE_HASH_SEED",
    "SUPPORTED_ALGORITHMS",
    "BlockHasher",
    "HashSeedError",
    "cbor_dumps",
    "external_block_hash",
    "resolve_hash_seed",
]

#: Seed vLLM uses for NONE_HASH when PYTHONHASHSEED is unset and the algorithm is SHA-256 based.
DEFAULT_NONE_HASH_SEED: Final = "vllm-none-hash"
#: Algorithm names accepted by :class:`BlockHasher` (vLLM's ``prefix_caching_hash_algo``).
SUPPORTED_ALGORITHMS: Final = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
_NON_CRYPTO: Final = frozenset({"xxhash", "xxhash_cbor"})
_MASK64: Final = (1 << 64) - 1
_PICKLE_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL


class HashSeedError(ValueError):
    """The NONE_HASH seed cannot be reproduced outside the engine (xxhash without a seed)."""


def external_block_hash(digest: bytes | int) -> int:
    """Convert a block hash digest (or an already-converted int) to the published 64-bit int."""
    if isinstance(digest, int):
        return digest & _MASK64
    return int.from_bytes(digest[-8:], "big")


def resolve_hash_seed(algorithm: str, hash_seed: str | None = None) -> str:
    """Return the NONE_HASH seed vLLM would use: explicit seed, else PYTHONHASHSEED, else default.

    Raises :class:`HashSeedError` for the xxhash algorithms when no seed is known, because vLLM then
    draws a random per-process seed that nobody outside the engine can reproduce.
    """
    if hash_seed is not None:
        return hash_seed
    env_seed = os.environ.get("PYTHONHASHSEED")
    if env_seed is not None:
        return env_seed
    if algorithm in _NON_CRYPTO:
        raise HashSeedError(
            f"prefix_caching_hash_algo={algorithm!r} without PYTHONHASHSEED: vLLM seeds NONE_HASH "
            "with random bytes per engine process, so no router can ever match its block hashes. "
            "Set PYTHONHASHSEED to the same value for every engine and pass it as hash_seed "
            "(or export it here), or use sha256/sha256_cbor."
        )
    return DEFAULT_NONE_HASH_SEED


# --------------------------------------------------------------------------------------------
# Canonical CBOR (RFC 8949 §4.2.1 deterministic encoding), enough for vLLM's hash inputs:
# None, bool, int (64-bit range), bytes, str, tuple/list. Byte-identical to
# ``cbor2.dumps(obj, canonical=True)`` for these types.
# --------------------------------------------------------------------------------------------

_UINT_CACHE: dict[int, bytes] = {}
_UINT_CACHE_MAX: Final = 1 << 20


def _cbor_head(major: int, n: int) -> bytes:
    """Encode a CBOR initial byte plus minimal-length argument."""
    mt = major << 5
    if n < 24:
        return bytes((mt | n,))
    if n < 0x100:
        return bytes((mt | 24, n))
    if n < 0x10000:
        return struct.pack(">BH", mt | 25, n)
    if n < 0x100000000:
        return struct.pack(">BI", mt | 26, n)
    if n <= _MASK64:
        return struct.pack(">BQ", mt | 27, n)
    raise ValueError(f"integer {n} out of the 64-bit CBOR range (bignums are not supported)")


def _cbor_int(value: int) -> bytes:
    """Encode an int (cached for small non-negative values such as token ids)."""
    enc = _UINT_CACHE.get(value)
    if enc is not None:
        return enc
    enc = _cbor_head(0, value) if value >= 0 else _cbor_head(1, -1 - value)
    if 0 <= value and len(_UINT_CACHE) < _UINT_CACHE_MAX:
        _UINT_CACHE[value] = enc
    return enc


def _cbor_encode(obj: Any, out: list[bytes]) -> None:
    if obj is None:
        out.append(b"\xf6")
    elif obj is True:
        out.append(b"\xf5")
    elif obj is False:
        out.append(b"\xf4")
    elif isinstance(obj, int):
        out.append(_cbor_int(obj))
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        out.append(_cbor_head(2, len(data)))
        out.append(data)
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        out.append(_cbor_head(3, len(data)))
        out.append(data)
    elif isinstance(obj, (tuple, list)):
        out.append(_cbor_head(4, len(obj)))
        for item in obj:
            _cbor_encode(item, out)
    else:
        raise TypeError(f"cannot CBOR-encode {type(obj).__name__} for block hashing")


def cbor_dumps(obj: Any) -> bytes:
    """Canonical CBOR encoding of None/bool/int/bytes/str/tuple/list (as cbor2 canonical=True)."""
    out: list[bytes] = []
    _cbor_encode(obj, out)
    return b"".join(out)


# --------------------------------------------------------------------------------------------
# Hash functions, each mapping a Python object to a digest exactly as vllm.utils.hashing does.
# --------------------------------------------------------------------------------------------


def _sha256_pickle(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=_PICKLE_PROTOCOL)).digest()


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor_dumps(obj)).digest()


def _xxh3_128() -> Callable[[bytes], bytes]:
    try:
        import xxhash  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "the 'xxhash' prefix caching algorithms need the xxhash package: pip install xxhash"
        ) from exc
    digest = getattr(xxhash, "xxh3_128_digest", None)
    if digest is None:  # pragma: no cover - very old xxhash
        raise ModuleNotFoundError("xxhash too old: xxh3_128_digest is missing")
    return digest  # type: ignore[no-any-return]


def _make_hash_fn(algorithm: str) -> Callable[[Any], bytes]:
    if algorithm == "sha256":
        return _sha256_pickle
    if algorithm == "sha256_cbor":
        return _sha256_cbor
    if algorithm == "xxhash":
        xxh = _xxh3_128()
        return lambda obj: xxh(pickle.dumps(obj, protocol=_PICKLE_PROTOCOL))
    if algorithm == "xxhash_cbor":
        xxh = _xxh3_128()
        return lambda obj: xxh(cbor_dumps(obj))
    raise ValueError(f"unsupported hash algorithm {algorithm!r}; expected one of {SUPPORTED_ALGORITHMS}")


class BlockHasher:
    """Computes the block hashes a vLLM engine publishes for a prompt's full blocks."""

    __slots__ = ("algorithm", "block_size", "hash_seed", "seed_source", "none_hash", "_hash_fn",
                 "_cache", "_cache_size", "_evict", "_prompts", "_prompt_blocks")

    def __init__(self, block_size: int, algorithm: str = "sha256", hash_seed: str | None = None,
                 cache_size: int = 0) -> None:
        """Configure for an engine's ``block_size``, ``prefix_caching_hash_algo`` and PYTHONHASHSEED.

        ``hash_seed=None`` reads PYTHONHASHSEED from this process's environment, falling back to
        vLLM's default seed for the SHA-256 algorithms and raising :class:`HashSeedError` for xxhash.
        ``cache_size`` > 0 (sha256, no extra keys): remember up to that many (parent digest,
        block tokens) -> digest, oldest forgotten first (a sixteenth of them at a time, once
        full), so that prefixes seen again (a system prompt, a conversation's history) cost a
        dictionary lookup per block, not a hash. The prompts hashed through it are also
        remembered whole (their full blocks' token ids, 8 bytes each, -> their hashes; at
        most ``cache_size`` blocks of them, oldest forgotten first), so that a prompt seen
        again costs one lookup.
        """
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self._cache_size = cache_size
        # forgetting one entry at a time (del cache[next(iter(cache))]) costs a scan over
        # every slot deleted since the dict last resized: ~0.6 ms per miss at 100k entries
        self._evict = max(1, cache_size // 16)
        self._cache: dict[tuple[bytes, tuple[int, ...]], tuple[bytes, int]] | None = (
            {} if cache_size and algorithm == "sha256" else None)
        # a prompt's full blocks' token ids (as int64 bytes) -> its hashes, with the number
        # of blocks they hold in all
        self._prompts: dict[bytes, tuple[int, ...]] = {}
        self._prompt_blocks = 0
        self.block_size: int = block_size
        self.algorithm: str = algorithm
        self._hash_fn: Callable[[Any], bytes] = _make_hash_fn(algorithm)
        self.hash_seed: str = resolve_hash_seed(algorithm, hash_seed)
        # Where the seed came from: "explicit", "PYTHONHASHSEED" or "vllm-default".
        self.seed_source: str = (
            "explicit" if hash_seed is not None
            else "PYTHONHASHSEED" if "PYTHONHASHSEED" in os.environ
            else "vllm-default"
        )
        self.none_hash: bytes = self._hash_fn(self.hash_seed)
        logger.info(
            "block hasher: algorithm=%s block_size=%d NONE_HASH seed from %s; engines must use the same "
            "(vLLM reads PYTHONHASHSEED, else %r for sha256*)",
            algorithm, block_size, self.seed_source, DEFAULT_NONE_HASH_SEED,
        )

    def __repr__(self) -> str:
        return f"BlockHasher(block_size={self.block_size}, algorithm={self.algorithm!r}, hash_seed={self.hash_seed!r})"

    def num_full_blocks(self, num_tokens: int) -> int:
        """Number of full blocks (the only ones vLLM hashes and caches) in ``num_tokens`` tokens."""
        return num_tokens // self.block_size

    def block_digests(
        self,
        token_ids: Sequence[int],
        *,
        lora: tuple[str, str] | None = None,
        cache_salt: str | None = None,
        parent: bytes | None = None,
    ) -> list[bytes]:
        """Full chained digests of every full block (vLLM's internal ``BlockHash`` values).

        ``lora`` is ``(lora_name, lora_path)`` of the request's adapter; ``cache_salt`` its salt;
        ``parent`` the digest preceding ``token_ids[0]`` (None: the prompt starts here).
        """
        tokens = _as_int_list(token_ids)
        bs = self.block_size
        n_full = len(tokens) // bs
        if n_full == 0:
            return []
        hash_fn = self._hash_fn
        prev = parent if parent else self.none_hash
        out: list[bytes] = []
        if lora is None and not cache_salt:
            # Fast path (no extra keys): specialise the serialisation to avoid per-call dispatch.
            if self.algorithm == "sha256":
                if parent is None and self._cache is not None:
                    return list(self._sha256_digests(tokens))
                dumps, sha = pickle.dumps, hashlib.sha256
                proto = _PICKLE_PROTOCOL
                for start in range(0, n_full * bs, bs):
                    prev = sha(dumps((prev, tuple(tokens[start : start + bs]), None), protocol=proto)).digest()
                    out.append(prev)
                return out
            for start in range(0, n_full * bs, bs):
                prev = hash_fn((prev, tuple(tokens[start : start + bs]), None))
                out.append(prev)
            return out
        lora_keys: list[tuple[str, ...]] = [("lora", lora[0], lora[1])] if lora is not None else []
        for i, start in enumerate(range(0, n_full * bs, bs)):
            keys: list[tuple[str, ...]] = list(lora_keys)
            if cache_salt and i == 0 and parent is None:
                keys.append(("cache_salt", cache_salt))
            extra = tuple(keys) if keys else None
            prev = hash_fn((prev, tuple(tokens[start : start + bs]), extra))
            out.append(prev)
        return out

    def block_hashes(
        self,
        token_ids: Sequence[int],
        *,
        lora: tuple[str, str] | None = None,
        cache_salt: str | None = None,
    ) -> list[int]:
        """Hashes of the prompt's full blocks in the form the engine publishes (low 64 bits, int)."""
        if self._cache is not None and lora is None and not cache_salt:
            return self._cached_hashes(_as_int_list(token_ids))
        return [int.from_bytes(d[-8:], "big") for d in self.block_digests(token_ids, lora=lora, cache_salt=cache_salt)]

    def iter_block_hashes(
        self,
        token_ids: Sequence[int],
        *,
        lora: tuple[str, str] | None = None,
        cache_salt: str | None = None,
    ) -> Iterator[int]:
        """The same hashes as :meth:`block_hashes`, each computed only when asked for: a
        prefix lookup that stops at the first block nobody holds hashes no further."""
        tokens = _as_int_list(token_ids)
        if lora is not None or cache_salt or self.algorithm != "sha256":
            return self._iter_with_keys(tokens, len(tokens) // self.block_size, lora, cache_salt)
        return self._sha256_hashes(tokens)

    def _iter_with_keys(self, tokens: Sequence[int], n_full: int,
                        lora: tuple[str, str] | None, cache_salt: str | None) -> Iterator[int]:
        bs = self.block_size
        prev = b""
        for i in range(n_full):
            block = tokens[i * bs:(i + 1) * bs]
            prev = (self.block_digests(block, lora=lora, cache_salt=cache_salt)[0] if i == 0
                    else self._next(prev, block, lora))
            yield int.from_bytes(prev[-8:], "big")

    def _blocks(self, tokens: Sequence[int]) -> Iterator[tuple[int, ...]]:
        """The prompt's full blocks as tuples of token ids (made in C, a partial last block
        left out)."""
        return zip(*[iter(tokens)] * self.block_size)

    def _sha256_hashes(self, tokens: Sequence[int]) -> Iterator[int]:
        """The published hash of each full block of a prompt without extra keys, sha256,
        computed lazily, through the cache when there is one."""
        cache = self._cache
        prev = self.none_hash
        if cache is None:
            dumps, sha, proto = pickle.dumps, hashlib.sha256, _PICKLE_PROTOCOL
            for block in self._blocks(tokens):
                prev = sha(dumps((prev, block, None), protocol=proto)).digest()
                yield int.from_bytes(prev[-8:], "big")
            return
        get, miss = cache.get, self._miss
        for block in self._blocks(tokens):
            prev, h = get((prev, block)) or miss(prev, block)
            yield h

    def _cached_hashes(self, tokens: Sequence[int]) -> list[int]:
        """The published hashes of a prompt without extra keys (sha256, a cache): the prompt
        remembered whole, else one cache probe a block (and the prompt remembered)."""
        n = len(tokens) // self.block_size
        if n == 0:
            return []
        full = n * self.block_size
        try:
            key = struct.pack(f"{full}q", *(tokens if len(tokens) == full else tokens[:full]))
        except struct.error:  # a token id beyond int64: not remembered whole
            return list(self._sha256_hashes(tokens))
        got = self._prompts.get(key)
        if got is not None:
            return list(got)
        hashes = list(self._sha256_hashes(tokens))
        if n <= self._cache_size:
            prompts = self._prompts
            while self._prompt_blocks + n > self._cache_size:  # the oldest sixteenth goes
                for old in list(islice(prompts, max(1, len(prompts) // 16))):
                    self._prompt_blocks -= len(prompts.pop(old))
            prompts[key] = tuple(hashes)
            self._prompt_blocks += n
        return hashes

    def _sha256_digests(self, tokens: Sequence[int]) -> Iterator[bytes]:
        """The digest of each full block (as :meth:`_sha256_hashes`, through the cache)."""
        get, miss = self._cache.get, self._miss  # type: ignore[union-attr]
        prev = self.none_hash
        for block in self._blocks(tokens):
            prev = (get((prev, block)) or miss(prev, block))[0]
            yield prev

    def _miss(self, prev: bytes, block: tuple[int, ...]) -> tuple[bytes, int]:
        """Hash a block not in the cache (sha256, no extra keys) and remember it, forgetting
        the oldest entries first when the cache is full."""
        cache = self._cache
        assert cache is not None
        d = hashlib.sha256(pickle.dumps((prev, block, None), protocol=_PICKLE_PROTOCOL)).digest()
        hit = (d, int.from_bytes(d[-8:], "big"))
        if len(cache) >= self._cache_size:
            for old in list(islice(cache, self._evict)):
                del cache[old]
        cache[(prev, block)] = hit
        return hit

    def _next(self, prev: bytes, block: Sequence[int], lora: tuple[str, str] | None) -> bytes:
        """The digest of a block that is not the prompt's first, after ``prev``."""
        extra = (("lora", lora[0], lora[1]),) if lora is not None else None
        return self._hash_fn((prev, tuple(block), extra))


def _as_int_list(token_ids: Sequence[int]) -> Sequence[int]:
    """Return token ids as a sequence of plain Python ints (pickle of numpy ints would differ)."""
    if isinstance(token_ids, (list, tuple)):
        if not token_ids or type(token_ids[0]) is int:
            return token_ids
        return [int(t) for t in token_ids]
    tolist = getattr(token_ids, "tolist", None)
    if callable(tolist):
        converted = tolist()
        if isinstance(converted, list):
            return [int(t) for t in converted] if converted and type(converted[0]) is not int else converted
    return [int(t) for t in token_ids]
