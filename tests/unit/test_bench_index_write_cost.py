"""bench.index_write_cost: its command line refuses bad input."""

from __future__ import annotations

import os
import subprocess
import sys


def test_bad_arguments_exit_2_with_a_message() -> None:
    for bad in (["--setups", "cluster,nope"], ["--rounds", "0"]):
        out = subprocess.run([sys.executable, "-m", "bench.index_write_cost", *bad],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert out.returncode == 2, out.stderr
        assert "error:" in out.stderr
