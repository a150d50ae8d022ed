#!/usr/bin/env bash
# Run tok1d's test suite (installs first if .venv is missing or out of date). Offline.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo"
bash install.sh
export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
