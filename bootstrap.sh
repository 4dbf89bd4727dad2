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

case "${1:-}" in
  run)
    setup
    shift
    exec "$VENV/bin/appliance" demo "$@"
    ;;
  test)
    apt_install
    setup
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
