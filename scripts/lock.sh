#!/usr/bin/env bash
# Re-resolve every dependency from pyproject.toml into constraints.txt, in a new virtual
# environment. Upgrades are deliberate: run this, then `bash .ci/run`, and commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "torch==2.13.*"
"$venv/bin/python" -m pip install -q -e ".[all,dev]"
{
    echo "# The versions fedmobillm is tested with (Python 3.11, CPU). Every install in the README and"
    echo "# .ci/run applies it with -c constraints.txt. Upgrades are deliberate: change a pin (or run"
    echo "# scripts/lock.sh to re-resolve everything), run bash .ci/run, commit both."
    # torch: pin the release, not the local build tag (+cpu), so CPU and CUDA builds both match
    "$venv/bin/python" -m pip freeze --exclude-editable | grep -v -i '^fedmobillm' \
        | sed -E 's/^(torch==[0-9.]+)\+.*/\1/'
} > constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pins from $venv"
