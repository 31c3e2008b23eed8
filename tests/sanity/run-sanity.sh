#!/usr/bin/env bash
# Run `ansible-test sanity` on this collection, offline except for PyPI, with the local Python only.
#
#   tests/sanity/run-sanity.sh [extra ansible-test sanity args, e.g. --test pep8]
#   VENV=/path/to/venv tests/sanity/run-sanity.sh
#
# 1. Copies the collection (git-tracked + untracked-not-ignored files, symlinks resolved) into
#    .build/sanity/ansible_collections/<namespace>/<name>/, fresh on every run: ansible-test only
#    works from inside an ansible_collections/<ns>/<name>/ tree.
# 2. Pre-seeds ~/.ansible/test/cache/get_pip_<ver>.py: ansible-test would download get-pip-<ver>.py
#    from ci-files.testing.ansible.com (unreachable here) to bootstrap pip into its test venvs.
#    The stand-in installs pip from a wheel fetched once with `pip download pip==<ver>`.
# 3. Installs shellcheck with apt if it is missing (root only; SANITY_APT=0 skips this), else the
#    test of shell scripts is silently skipped.
# 4. Runs sanity against the venv's Python only (no docker, no other interpreters), exits with its code.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO_ROOT"

VENV=${VENV:-.venv}
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
[[ -x "$PY" ]] || { echo "run-sanity: no python in venv $VENV (set VENV=...)" >&2; exit 2; }
[[ -x "$VENV/bin/ansible-test" ]] || { echo "run-sanity: ansible-test not in $VENV/bin" >&2; exit 2; }
command -v git >/dev/null || { echo "run-sanity: git is required (apt-get install git)" >&2; exit 2; }
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

read -r NAMESPACE NAME < <("$PY" -c '
import yaml
g = yaml.safe_load(open("galaxy.yml"))
print(g["namespace"], g["name"])')

# --- 1. fresh copy of the collection -------------------------------------------------------------
BUILD="$REPO_ROOT/.build/sanity"
DEST="$BUILD/ansible_collections/$NAMESPACE/$NAME"
rm -rf "$BUILD/ansible_collections"
mkdir -p "$DEST"
# -c lists files deleted from the work tree too, so keep only what exists; -h copies symlink targets.
git ls-files -z -co --exclude-standard \
    | while IFS= read -r -d '' f; do
          case "$f" in .build/*|tests/output/*) continue ;; esac
          if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi
      done \
    | sort -zu \
    | tar -C "$REPO_ROOT" --null -T - -h -cf - \
    | tar -C "$DEST" -xf -

# --- 2. offline get-pip for ansible-test's venv bootstrap ----------------------------------------
PIP_VERSION=$("$PY" -c '
import types
from ansible_test._internal.python_requirements import get_venv_packages
print(get_venv_packages(types.SimpleNamespace(version="'"$PYVER"'"))["pip"])')
CACHE="$HOME/.ansible/test/cache"
GET_PIP="$CACHE/get_pip_${PIP_VERSION//./_}.py"
mkdir -p "$CACHE"
if ! compgen -G "$CACHE/pip-$PIP_VERSION-*.whl" >/dev/null; then
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$CACHE" "pip==$PIP_VERSION"
fi
if [[ ! -s "$GET_PIP" ]]; then
    cat > "$GET_PIP.tmp" <<'EOF'
"""Offline stand-in for get-pip.py, written by tests/sanity/run-sanity.sh.

ansible-test runs this with pip's arguments (e.g. `pip==24.2 --no-setuptools --no-wheel`) to put
pip into an empty venv. It runs pip from the wheel next to it and installs from that directory.
"""
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = [a for a in sys.argv[1:] if a not in ('--no-setuptools', '--no-wheel')]
WANTED = [a for a in ARGS if not a.startswith('-')]
VERSION = next((a.split('==', 1)[1] for a in WANTED if a.startswith('pip==')), '*')
WHEELS = sorted(glob.glob(os.path.join(HERE, 'pip-%s-*.whl' % VERSION)))
if not WHEELS:
    sys.exit('offline get-pip: no pip-%s wheel in %s' % (VERSION, HERE))
sys.path.insert(0, WHEELS[-1])

from pip._internal.cli.main import main  # noqa: E402  pylint: disable=wrong-import-position

# Only pip itself is local; let anything else come from the index.
INDEX = ['--no-index'] if all(a.startswith('pip==') for a in WANTED) else []
sys.exit(main(['install', '--find-links', HERE] + INDEX + ARGS))
EOF
    mv "$GET_PIP.tmp" "$GET_PIP"
fi

# --- 3. shellcheck -------------------------------------------------------------------------------
if ! command -v shellcheck >/dev/null && [[ ${SANITY_APT:-1} == 1 && $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq shellcheck >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq shellcheck >/dev/null; } \
        || echo "run-sanity: could not install shellcheck; the shellcheck test will be skipped" >&2
fi

# --- 4. sanity ----------------------------------------------------------------------------------
export PATH="$VENV/bin:$PATH"
# Without this ansible-test walks up from the copy, finds this repo's .git, asks git for the files
# under .build/ (ignored, so none) and tests nothing.
export ANSIBLE_TEST_CONTENT_ROOT="$DEST"
cd "$DEST"
# Once (2026-12-06) pylint under ansible-test crashed in isort's os.getcwd() (FileNotFoundError)
# with nothing wrong in the code; a rerun passed. Such a tool crash, and only it, is retried once,
# loudly: a real finding fails both runs.
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
status=0
"$VENV/bin/ansible-test" sanity --python "$PYVER" "$@" 2>&1 | tee "$LOG" || status=$?
if [[ $status -ne 0 ]] && grep -q "os.getcwd()" "$LOG" && grep -q "FileNotFoundError" "$LOG"; then
    echo "run-sanity: a sanity tool crashed in os.getcwd() (not a finding); running sanity once more" >&2
    cd "$DEST"
    status=0
    "$VENV/bin/ansible-test" sanity --python "$PYVER" "$@" || status=$?
fi
exit $status
