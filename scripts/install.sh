#!/usr/bin/env bash
# Create the virtual environment if it is missing and install gradsmooth into it with the
# pinned environment of requirements.lock. Called by the Makefile only when the stamp file
# is older than pyproject.toml or requirements.lock.
set -euo pipefail

venv="${1:-.venv}"

if [ ! -x "$venv/bin/python" ]; then
    echo "Creating $venv"
    python3 -m venv "$venv"
fi

"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -c requirements.lock -e '.[test]'
touch "$venv/.installed"
echo "Installed gradsmooth into $venv"
