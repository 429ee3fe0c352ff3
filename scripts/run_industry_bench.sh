#!/usr/bin/env bash
# guidellm (an industry LLM benchmark client) against splitserve's gateway, next to
# `splitserve bench` on the same load; figures agree or not (docs/benchmarks.md).
#
#   scripts/run_industry_bench.sh                          # starts a default cluster itself
#   scripts/run_industry_bench.sh --url http://127.0.0.1:8000 --model-dir DIR
#   scripts/run_industry_bench.sh --json docs/results/industry_guidellm.json
#
# On first use guidellm is installed into its own virtual environment under .cache/tools
# (never into .venv, and not part of CI's install): CPU torch first, so that nothing pulls a
# CUDA build. All arguments go to `python -m bench.industry` (see --help there).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SPLITSERVE_VENV:-$repo/.venv}"
tools="$repo/.cache/tools/guidellm"
GUIDELLM_VERSION="0.8.1"
TORCH_CPU_VERSION="2.13.0"
python="${SPLITSERVE_PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

installed() {
  [ -x "$tools/bin/guidellm" ] && "$tools/bin/python" -c "import importlib.metadata as m, sys
sys.exit(m.version('guidellm') != '$GUIDELLM_VERSION')" 2>/dev/null
}
if ! installed; then
  echo "[industry] installing guidellm $GUIDELLM_VERSION into $tools" >&2
  "$python" -m venv "$tools"
  pip() { "$tools/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
  pip install -q --upgrade pip
  pip install -q "torch==$TORCH_CPU_VERSION"
  pip install -q "guidellm==$GUIDELLM_VERSION" "torch==$TORCH_CPU_VERSION"
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[industry] no splitserve environment at $venv: run scripts/install.sh first" >&2
  exit 2
fi
cd "$repo"
export PYTHONHASHSEED="${PYTHONHASHSEED:-0}"
exec "$venv/bin/python" -m bench.industry "$@"
