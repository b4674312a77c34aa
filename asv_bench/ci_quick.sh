#!/usr/bin/env bash
# A quick pass over every asv benchmark against the current environment: small sizes
# (LOSSFORGE_ASV_QUICK=1, see benchmarks/common.py), each benchmark run once (--quick), in
# the interpreter that runs this script (--python=same: no build, no saved results; and
# --dry-run: nothing written to asv_bench/.asv/results). Exits non-zero when a benchmark
# fails (asv returns 2) or cannot be discovered.
#
#   bash asv_bench/ci_quick.sh                 # every benchmark
#   bash asv_bench/ci_quick.sh -b cross_entropy # extra arguments go to `asv run`
#
# PYTHON selects the interpreter (default: `python` on PATH, e.g. an activated venv); it
# needs lossforge installed and asv >= 0.6 (`pip install -e ".[bench]"`).
set -euo pipefail
python="${PYTHON:-python}"
if [[ "$python" == */* ]]; then  # a path: make it absolute (not resolved: a venv's link)
    python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
fi
cd "$(dirname "${BASH_SOURCE[0]}")"
if ! "$python" -c "import asv, lossforge" 2>/dev/null; then
    echo "ci_quick.sh: $python needs asv and lossforge (pip install -e \".[bench]\")" >&2
    exit 1
fi
# asv wants a machine description; a dedicated name leaves the user's own entry alone.
machine=lossforge-ci-quick
"$python" -m asv machine --machine "$machine" --yes >/dev/null
start=$SECONDS
LOSSFORGE_ASV_QUICK=1 "$python" -m asv run --machine "$machine" --python=same --quick \
    --show-stderr --dry-run "$@" </dev/null
echo "ci_quick.sh: every benchmark ran, in $((SECONDS - start)) s"
