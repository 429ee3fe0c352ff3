#!/usr/bin/env bash
# Installs what serving needs (scripts/install.sh with SPLITSERVE_INSTALL=serve: no test
# extras, no helm/kubectl/checkov/prometheus) and starts a cluster on the embedded default:
# a private Redis, a local Ray, one prefill and one decode worker with the built-in tiny model,
# and the gateway on http://127.0.0.1:8000. Ctrl-C stops it all.
# Extra arguments go to `splitserve up` (see `splitserve up --help`).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SPLITSERVE_INSTALL="${SPLITSERVE_INSTALL:-serve}" "$repo/scripts/install.sh"
exec "${SPLITSERVE_VENV:-$repo/.venv}/bin/splitserve" up "$@"
