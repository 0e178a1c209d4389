#!/usr/bin/env bash
# Sets up everything campus-iot needs on a Debian-like machine, idempotently:
#   1. Debian packages listed in scripts/debian-packages.txt (installed when root, else explained);
#   2. a virtual environment in .venv with the package and its test extras (editable).
# Quick when nothing changed: packages are checked with dpkg-query, the venv by a stamp file.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
mapfile -t wanted < <(grep -v '^\s*#' scripts/debian-packages.txt | tr -s ' \t' '\n' | grep -v '^$')

python_ok() {
    command -v "$PYTHON" >/dev/null 2>&1 &&
        "$PYTHON" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
if ! python_ok; then
    wanted+=(python3 python3-venv)
fi

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${wanted[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
else
    for cmd in mosquitto mosquitto_pub mbpoll; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "campus-iot: not a Debian-like system and these commands are missing: ${missing[*]}" >&2
        echo "Install them with your package manager, then run 'make install' again." >&2
        exit 1
    fi
fi

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "campus-iot: installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "campus-iot: these Debian packages are missing: ${missing[*]}" >&2
        echo "Run this once as root, then 'make install' again:" >&2
        echo "    sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

if ! python_ok; then
    echo "campus-iot: $PYTHON must be Python 3.11 or newer with the venv module." >&2
    exit 1
fi

stamp="$VENV/.campus-iot-installed"
if [ ! -x "$VENV/bin/python" ]; then
    echo "campus-iot: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "campus-iot: installing the package and its test extras into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    touch "$stamp"
fi
