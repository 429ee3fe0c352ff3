#!/usr/bin/env bash
# Installs everything (scripts/install.sh) and starts a cluster on the embedded default:
# a private Redis, a local Ray, one prefill and one decode worker with the built-in tiny model,
# and the gateway on http://127.0.0.1:8000. Ctrl-C stops it all.
# Extra arguments go to `splitserve up` (see `splitserve up --help`).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/install.sh"
exec "${SPLITSERVE_VENV:-$repo/.venv}/bin/splitserve" up "$@"
