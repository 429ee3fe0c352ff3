#!/usr/bin/env bash
# Installs everything (scripts/install.sh, full profile: test extras and the chart/prometheus
# tools) and runs the whole test suite:
# unit, integration (real Redis, real vLLM engines) and end-to-end (whole clusters).
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/unit -k registry`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SPLITSERVE_INSTALL=full "$repo/scripts/install.sh"
cd "$repo"
export PYTHONHASHSEED=0
if [ "$#" -eq 0 ]; then set -- tests; fi
exec "${SPLITSERVE_VENV:-$repo/.venv}/bin/python" -m pytest -p no:cacheprovider -ra --durations=40 "$@"
