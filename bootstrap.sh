#!/usr/bin/env bash
# One entry point for a fresh Debian machine (as root, or with sudo for apt-get):
#   ./bootstrap.sh run    set up and run the appliance on its defaults (reference models, CPU)
#   ./bootstrap.sh test   set up and run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

apt_install() {
  local missing=()
  command -v /usr/bin/storescu >/dev/null || missing+=(dcmtk)
  command -v Orthanc >/dev/null || missing+=(orthanc)
  command -v mosquitto >/dev/null || missing+=(mosquitto)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v dciodvfy >/dev/null || missing+=(dicom3tools)   # DICOM validator for what the box writes (tests)
  command -v npm >/dev/null || missing+=(npm)                 # Azurite, the Blob Storage emulator (tests)
  if ((${#missing[@]})); then
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

setup() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e ".[dev]"
}

# Test-only tools outside the main venv, each skipped when already there:
# - Azurite (Blob Storage emulator), pinned in package.json, into ./node_modules (testsupport/azurite.py finds it);
# - Microsoft's device SDK azure-iot-device, which needs paho-mqtt<2, in its own venv .venv-sdk
#   (testsupport/sdk.py finds it) as a second device client against the fake hub.
SDK_VENV=${SDK_VENV:-.venv-sdk}
test_tools() {
  if [ ! -x node_modules/.bin/azurite-blob ]; then
    npm install --no-audit --no-fund --no-package-lock --loglevel=error
  fi
  if [ ! -x "$SDK_VENV/bin/python" ] || ! "$SDK_VENV/bin/python" -c "import azure.iot.device" 2>/dev/null; then
    "$PY" -m venv "$SDK_VENV"
    "$SDK_VENV/bin/pip" install -q "azure-iot-device==2.14.0" "paho-mqtt==1.6.1"
  fi
}

case "${1:-}" in
  run)
    setup
    shift
    exec "$VENV/bin/appliance" demo "$@"
    ;;
  test)
    apt_install
    setup
    test_tools
    shift
    echo "== lint (ruff), layer contracts (import-linter), types (mypy)" >&2
    "$VENV/bin/ruff" check .
    "$VENV/bin/lint-imports" --no-cache
    "$VENV/bin/mypy"
    set +e
    "$VENV/bin/python" -m pytest "$@"
    rc=$?
    set -e
    if [ "$rc" = 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
    exit "$rc"
    ;;
  *)
    echo "usage: $0 run|test [args]" >&2
    exit 2
    ;;
esac
