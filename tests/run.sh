#!/usr/bin/env bash
# The test command of the README: the fast suite (slow tests are opt-in with `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q -rs -n 2 -m "not slow" tests "$@"
