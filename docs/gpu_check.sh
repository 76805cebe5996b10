#!/usr/bin/env bash
# Every GPU check (CUDA graphs, the CUDA bench, packing on a GPU, bf16) in one run, for a
# session that has a GPU (see ../shared/GPU_NOTES.md).
#
# On a machine with package-index access first build the wheels the GPU node lacks:
#   bash ../shared/gpu/wheelhouse.sh .whl          # /.whl/ is ignored (.git/info/exclude)
# then run this script on the GPU node from the project root (the device tool's `carry: [".whl"]`).
# It writes everything it measures under ${OUT:-gpu_out}/ and prints a summary.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD  # Ray's workers inherit it
fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # the embedded Ray stays on 127.0.0.1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"

# 1. Graphed and eager training agree (the test is skipped where there is no CUDA).
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tail -5 \
  | tee "$out/test_graphs.txt"

# 2. The SPEC configuration, 5 seeds: eager vs graphed step and epoch, launches, busy share.
timeout 300 python3 -m poh_tune.bench --device cuda --seeds 5 --epochs 3 \
  > "$out/bench_5_seeds.json" 2> "$out/bench_5_seeds.log"; tail -1 "$out/bench_5_seeds.log"

# 3. Eleven configurations x 5 seeds packed together.
timeout 300 python3 -m poh_tune.bench --device cuda --seeds 5 --pack 11 --epochs 2 \
  > "$out/bench_pack_11.json" 2> "$out/bench_pack_11.log"; tail -1 "$out/bench_pack_11.log"

# 4. The document's whole grid through the real launcher, Ray start and report included.
start=$(date +%s)
timeout 600 python3 -m poh_tune.launch grid --gpus-per-trial 0.2 --cpus-per-trial 3 \
  --storage "$out/runs" --name document_grid > "$out/grid.log" 2>&1
echo "launch grid: exit $? after $(( $(date +%s) - start )) s" | tee "$out/grid_wall.txt"
cp "$out/runs/document_grid/report.md" "$out/" 2>/dev/null || true
