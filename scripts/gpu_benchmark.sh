#!/usr/bin/env bash
# The origin's question on a GPU in one command, with no network: install the carried wheels of the packages the
# GPU image lacks (wheels/: clu, ml_collections, tensorboardX) into a private folder, put it and the project on the
# path, then run scripts/gpu_benchmark.py (its --help says the rest; --rehearse runs the same steps on a CPU).
#   bash scripts/gpu_benchmark.sh [--out DIR] [--budget-s 420] [--rehearse]
set -euo pipefail
started=$(date +%s.%N)  # the budget counts from here, the install included
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
python=${PYTHON:-python3}
site=${GPU_BENCHMARK_SITE:-/tmp/gpu-benchmark-site}
"$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$repo"/wheels/*.whl
# On a GPU machine the project is copied, not pip-installed: the repository root on PYTHONPATH (ahead of any
# value it had) lets gpu_benchmark.py and the scripts it starts import shared_data, bench, report and the stacks.
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" "$repo/scripts/gpu_benchmark.py" --started-at "$started" "$@"
