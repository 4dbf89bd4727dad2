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
  command -v systemd-analyze >/dev/null || missing+=(systemd)  # scores the service unit's sandbox (tests)
  command -v chromium >/dev/null || missing+=(chromium)       # the dashboard's browser test (headless)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  if ((${#missing[@]})); then
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

step() { printf '== %s\n' "$*" >&2; }

# pip without its warnings (running as root, a newer pip) and with one short line per package it fetches
# (overwritten in place on a terminal) instead of a silent minute; everything pip said goes to
# $VENV/pip-install.log, whose end is shown if it fails.
pip_install() {
  local log="$VENV/pip-install.log"
  if ! PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_PROGRESS_BAR=off \
      "$VENV/bin/pip" install "$@" 2>&1 | tee "$log" | awk -v tty="$([ -t 2 ] && echo 1)" '
        /^Collecting / { n++; line = sprintf("   %3d  %s", n, $2)
                         if (tty) printf "\r%-72s", line > "/dev/stderr"; else print line > "/dev/stderr"
                         fflush("/dev/stderr") }
        /^Successfully installed/ { if (tty) printf "\r%-72s\r", "" > "/dev/stderr"
                                    printf "   installed %d package(s)\n", NF - 2 > "/dev/stderr" }'; then
    echo "pip install $* failed; its last lines (all of them in $log):" >&2
    tail -n 30 "$log" >&2
    return 1
  fi
}

setup() {
  if [ -x "$VENV/bin/python" ]; then
    step "[1/3] Python environment: $VENV (exists)"
  else
    step "[1/3] creating the Python environment $VENV ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV"
  fi
  # reinstalled only when pyproject.toml or constraints.txt (the dependencies) changed since the last install
  local stamp
  stamp="$VENV/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ]; then
    step "[2/3] dependencies up to date"
    return
  fi
  step "[2/3] installing the appliance and its dependencies into $VENV (first time: a few minutes)"
  pip_install --upgrade pip
  pip_install -c constraints.txt -e ".[dev]"   # the exact versions tested (constraints.txt)
  rm -f "$VENV"/.installed-*
  touch "$stamp"
}

# Test-only tools outside the main venv, each skipped when already there:
# - Azurite (Blob Storage emulator) and axe-core (the dashboard's accessibility checks in Chromium), pinned in
#   package.json, into ./node_modules (testsupport/azurite.py and tests/test_feedback_daemon.py find them);
# - Microsoft's device SDK azure-iot-device, which needs paho-mqtt<2, in its own venv .venv-sdk
#   (testsupport/sdk.py finds it) as a second device client against the fake hub.
SDK_VENV=${SDK_VENV:-.venv-sdk}
test_tools() {
  if [ ! -x node_modules/.bin/azurite-blob ] || [ ! -f node_modules/axe-core/axe.min.js ]; then
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
    step "[3/3] starting the demo: the appliance with the reference models, phantom studies sent over DICOM"
    step "      the command is $(cd "$VENV" && pwd)/bin/appliance (not on PATH: type that full path, or first: source $VENV/bin/activate)"
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
    # three workers (pytest-xdist): most tests wait on daemons, networks and timeouts, so a 2-core machine runs
    # the suite in about half the serial time; PYTEST_WORKERS=0 runs it in one process
    "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-3}" "$@"
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
