"""Key names of the prefix index on a single Redis or a Redis Cluster (the one place they are made).

The index is split into ``partitions``; each partition is ONE cluster hash slot, holding its
buckets, its change log and nothing else. A block's bucket is the hash's top ``bucket_bits``
bits; a bucket's partition is ``bucket % partitions``. ``ns`` is the namespace; ``<tag>`` a
partition's hash tag (below)::

    {<tag>}:b:<bucket hex>  ZSET, scores 0, members "<16 hex digits of the block hash><epoch id>"
    {<tag>}:log             STREAM: every change of the partition's buckets, in order
    {ns:kv}:ids, :names, :next, :ver, :retired, :log   the epoch metadata and its change log
    {ns:kv}:layout          STRING: bucket_bits and partitions, as the first writer set them
    ns:kv:n:{<worker id>}   STRING: blocks held by the worker's current epoch

**Partition tags.** Partition ``p``'s tag is ``ns:kv:<p>.<s>``, with the smallest ``s`` whose
hash slot lies near the middle of the ``p``-th of ``partitions`` equal slot ranges. A cluster
made by ``redis-cli --cluster create`` gives each primary one contiguous range, so with
``partitions`` a multiple of the number of primaries every primary serves as many partitions.

Every writer and reader of one index must use the same ``bucket_bits`` and ``partitions``:
a writer records them in ``{ns:kv}:layout`` when it allocates an epoch and refuses to write
under another layout; a replica refuses to follow one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

__all__ = ["IndexLayout", "MAX_PARTITIONS"]

#: Most partitions an index may have (each is one hash slot; more would make the tags slow to find).
MAX_PARTITIONS = 256


def _partition_tag(namespace: str, p: int, partitions: int) -> str:
    width = REDIS_CLUSTER_HASH_SLOTS / partitions
    centre = (p + 0.5) * width
    slack = max(width / 4, 0.5)
    s = 0
    while True:
        tag = f"{namespace}:kv:{p}.{s}"
        if abs(key_slot(tag.encode()) + 0.5 - centre) <= slack:
            return tag
        s += 1


@dataclass(frozen=True)
class IndexLayout:
    """Where each part of one index lives."""

    namespace: str
    bucket_bits: int = 16
    partitions: int = 3
    tags: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ns = self.namespace
        if not ns or any(c.isspace() or c in "{}" for c in ns):
            raise ValueError(f"invalid namespace {ns!r}")
        if not 1 <= self.bucket_bits <= 24:
            raise ValueError(f"bucket_bits must be in 1..24, not {self.bucket_bits}")
        if not 1 <= self.partitions <= min(MAX_PARTITIONS, 2 ** self.bucket_bits):
            raise ValueError(f"partitions must be in 1..{MAX_PARTITIONS} and at most "
                             f"2**bucket_bits, not {self.partitions}")
        object.__setattr__(self, "tags", tuple(_partition_tag(ns, p, self.partitions)
                                               for p in range(self.partitions)))

    # -- buckets ---------------------------------------------------------------------------------

    @property
    def shift(self) -> int:
        """A block hash's bucket is ``hash >> shift``."""
        return 64 - self.bucket_bits

    def bucket_of(self, block_hash: int) -> int:
        """The bucket number of a block hash."""
        return block_hash >> (64 - self.bucket_bits)

    def partition_of(self, block_hash: int) -> int:
        """The partition a block hash belongs to."""
        return (block_hash >> (64 - self.bucket_bits)) % self.partitions

    def bucket_key(self, block_hash: int) -> str:
        """Key of the bucket (ZSET) holding ``block_hash``'s members."""
        b = block_hash >> (64 - self.bucket_bits)
        return f"{{{self.tags[b % self.partitions]}}}:b:{b:x}"

    def partition_bucket_pattern(self, p: int) -> str:
        """SCAN pattern of partition ``p``'s buckets."""
        return f"{{{self.tags[p]}}}:b:*"

    def bucket_pattern(self) -> str:
        """SCAN pattern of every bucket of the index."""
        return f"{{{self.namespace}:kv:*}}:b:*"

    def bucket_keys(self, p: int) -> Iterator[str]:
        """Every possible bucket key of partition ``p`` (most may not exist)."""
        tag = self.tags[p]
        for b in range(p, 2 ** self.bucket_bits, self.partitions):
            yield f"{{{tag}}}:b:{b:x}"

    # -- logs and metadata -----------------------------------------------------------------------

    def log_key(self, p: int) -> str:
        """Partition ``p``'s change log (a stream)."""
        return f"{{{self.tags[p]}}}:log"

    def slot_of(self, p: int) -> int:
        """The hash slot partition ``p`` lives in."""
        return key_slot(self.tags[p].encode())

    @property
    def meta(self) -> str:
        """The hash tag of the epoch metadata."""
        return f"{{{self.namespace}:kv}}"

    @property
    def ids_key(self) -> str:
        """HASH worker id -> its current epoch id."""
        return f"{self.meta}:ids"

    @property
    def names_key(self) -> str:
        """HASH epoch id -> worker id (current and retired epochs, until swept)."""
        return f"{self.meta}:names"

    @property
    def next_key(self) -> str:
        """STRING, the last epoch id allocated."""
        return f"{self.meta}:next"

    @property
    def ver_key(self) -> str:
        """STRING, bumped whenever the ids hash changes."""
        return f"{self.meta}:ver"

    @property
    def retired_key(self) -> str:
        """ZSET epoch id -> unix time it was retired (the sweep removes its members)."""
        return f"{self.meta}:retired"

    @property
    def layout_key(self) -> str:
        """STRING: the layout the index's first writer used (:attr:`signature`)."""
        return f"{self.meta}:layout"

    @property
    def signature(self) -> str:
        """What every writer and reader of one index must agree on."""
        return f"bucket_bits={self.bucket_bits} partitions={self.partitions}"

    @property
    def meta_log_key(self) -> str:
        """STREAM of epoch changes: ``o=n`` (new epoch) and ``o=x`` (retired), with ``w`` and ``c``."""
        return f"{self.meta}:log"

    def count_key(self, worker_id: str) -> str:
        """How many blocks ``worker_id``'s current epoch holds."""
        return f"{self.namespace}:kv:n:{{{worker_id}}}"

    def alive_key(self, worker_id: str) -> str:
        """The registry's liveness key of ``worker_id`` (router/registry.py)."""
        return f"{self.namespace}:worker:{worker_id}:alive"

    @property
    def workers_key(self) -> str:
        """The registry's set of known worker ids."""
        return f"{self.namespace}:workers"
