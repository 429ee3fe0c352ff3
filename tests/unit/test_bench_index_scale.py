"""bench.index_scale: its command line refuses bad input, and its bucket sizing rule."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.index_scale import _bucket_bits


def test_bad_arguments_exit_2_with_a_message() -> None:
    for bad in (["--workers", "0"], ["--seconds", "0"], ["--blocks", "x"]):
        out = subprocess.run([sys.executable, "-m", "bench.index_scale", *bad],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert out.returncode == 2, out.stderr
        assert "error:" in out.stderr


def test_bucket_bits_keep_buckets_listpack_sized() -> None:
    for pairs in (1_000, 100_000, 10_000_000, 100_000_000):
        bits = _bucket_bits(pairs)
        assert pairs / 2**bits <= 128 or bits == 24
    assert _bucket_bits(10) == 8
