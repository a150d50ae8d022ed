#!/usr/bin/env bash
# Install tok1d on a fresh Debian machine with Python 3.11: Debian data packages (when apt is
# usable), then a virtualenv in .venv with every Python dependency, pinned by constraints.txt.
# Idempotent: a second run only checks that nothing changed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

debian_packages=(dataset-fashion-mnist tuxpaint-stamps-default)
missing=()
for package in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "install.sh: WARNING: could not install ${missing[*]}; presets that read them will fail" >&2
  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "install.sh: WARNING: could not install ${missing[*]}" >&2
  else
    echo "install.sh: WARNING: apt is not usable; install ${missing[*]} yourself or use other sources" >&2
  fi
fi

stamp=".venv/.tok1d-installed"
wanted="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  echo "install.sh: .venv is up to date"
  exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
echo "install.sh: installing Python packages into .venv (torch is large: a few minutes)"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
echo "$wanted" > "$stamp"
echo "install.sh: done; run .venv/bin/tok1d --help"
