"""router.index_layout: partitions are one slot each, spread over the slot space."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from router.index_layout import IndexLayout


def test_partitions_sit_in_their_own_slot_range_and_keys_share_the_slot() -> None:
    for parts in (1, 3, 6, 12, 64):
        layout = IndexLayout("splitserve", 16, parts)
        width = 16384 / parts
        for p in range(parts):
            slot = layout.slot_of(p)
            assert p * width <= slot < (p + 1) * width
            assert key_slot(layout.log_key(p).encode()) == slot
        for h in (0, 1, 2**63, 2**64 - 1, 0x1234_5678_9ABC_DEF0):
            p = layout.partition_of(h)
            assert key_slot(layout.bucket_key(h).encode()) == layout.slot_of(p)
            assert layout.bucket_key(h) in set(layout.bucket_keys(p))


def test_a_three_primary_cluster_serves_two_partitions_each() -> None:
    layout = IndexLayout("splitserve", 16, 6)
    # redis-cli --cluster create: primary i serves [i*16384/3, (i+1)*16384/3)
    owners = [int(layout.slot_of(p) * 3 // 16384) for p in range(6)]
    assert sorted(owners) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("kw", [{"namespace": "a{b"}, {"namespace": ""},
                                {"namespace": "x", "bucket_bits": 0},
                                {"namespace": "x", "partitions": 0},
                                {"namespace": "x", "bucket_bits": 2, "partitions": 5},
                                {"namespace": "x", "partitions": 257}])
def test_bad_layouts_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        IndexLayout(**kw)
