#!/usr/bin/env bash
# Run tok1d's test suite (installs first if .venv is missing or out of date). Offline.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo"
bash install.sh
export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false
# Two workers (pytest-xdist), whole files per worker so module fixtures are built once; most
# slow tests wait on subprocesses and Prefect start-up, which overlap well. TOK1D_TEST_WORKERS=0: serial.
workers="${TOK1D_TEST_WORKERS:-2}"
parallel=()
[ "$workers" -gt 0 ] && parallel=(-n "$workers" --dist loadfile)
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "${parallel[@]}" "$@"
