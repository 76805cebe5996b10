#!/usr/bin/env bash
# The one command to run on a GPU machine: the CUDA tests, the CUDA bench (5 seeds, and 11
# configurations packed), and the document's whole grid through `launch grid` with its wall time.
# Every figure goes to one JSON file, $OUT/gpu_check.json; the script stops by itself at its time
# budget and says there which steps it did not reach.
#
#   bash ../shared/gpu/wheelhouse.sh .whl      # first, where the package index is reachable
#   bash docs/gpu_check.sh --budget 540        # on the GPU node, from the project root
#
# With the device tool: run(command="bash docs/gpu_check.sh --budget 540", carry=[".whl"],
# timeout_s=600). A step starts only when the budget has at least its minimum left, and runs
# under a timeout of what is left; the JSON is written after every step, so a kill keeps it.
set -uo pipefail
budget=540
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) budget=${2:?--budget needs seconds}; shift 2 ;;
    --budget=*) budget=${1#--budget=}; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (allowed: --budget SECONDS)" >&2; exit 2 ;;
  esac
done
case "$budget" in ''|*[!0-9]*) echo "error: --budget '$budget' is not a whole number of seconds" >&2; exit 2 ;; esac
out=${OUT:-gpu_out}
mkdir -p "$out" && out=$(cd "$out" && pwd)
steps="$out/steps.jsonl"
: > "$steps"
start=$(date +%s)
deadline=$(( start + budget ))
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # the embedded Ray stays on 127.0.0.1
py=${PYTHON:-python3}

summarise() {  # gpu_check.json from what the steps left in $out
  "$py" - "$out" "$budget" "$start" <<'PY'
import json, sys, time
from pathlib import Path
out, budget, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except Exception:
        return None
steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x.strip()]
card = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None
tests = None
junit = out / "cuda_tests.xml"
if junit.exists():
    import xml.etree.ElementTree as ET
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = lambda k: int(suite.get(k, 0))
    tests = {"tests": n("tests"), "failures": n("failures"), "errors": n("errors"),
             "skipped": n("skipped"), "time_s": float(suite.get("time", 0))}
grid = next((s for s in steps if s["name"] == "grid"), None)
summary = {
    "card": card, "budget_s": budget, "elapsed_s": int(time.time()) - start,
    "steps": steps,
    "not_reached": [s["name"] for s in steps if s["status"] == "not reached"],
    "cuda_tests": tests,
    "bench_5_seeds": load("bench_5_seeds.json"),
    "bench_pack_11": load("bench_pack_11.json"),
    "grid_wall_s": grid["wall_s"] if grid and grid["status"] == "ok" else None,
    "grid_report": str(out / "report.md") if (out / "report.md").exists() else None,
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
PY
}

record() {  # name status rc wall_s reason
  printf '{"name": "%s", "status": "%s", "rc": %s, "wall_s": %s, "reason": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" >> "$steps"
  summarise
  echo "[$(( $(date +%s) - start )) s] $1: $2${5:+ ($5)}"
}

gpu_ok=1
step() {  # name min_s cap_s 'command': run it when the budget allows, under what is left
  local name=$1 min=$2 cap=$3 cmd=$4
  local left=$(( deadline - $(date +%s) ))
  if [ "$gpu_ok" = 0 ] && [ "$name" != install ] && [ "$name" != cuda ]; then
    record "$name" "not reached" null null "no CUDA device"; return
  fi
  if [ "$left" -lt "$min" ]; then
    record "$name" "not reached" null null "${left} s of the budget left, it needs ${min} s"
    return
  fi
  local limit=$(( left < cap ? left : cap )) t0 rc
  t0=$(date +%s)
  # A fresh bash, so that timeout can run the functions below (they are declared into it).
  timeout "$limit" bash -c "$(declare -f install_wheels cuda_check grid); $cmd"
  rc=$?
  local wall=$(( $(date +%s) - t0 )) status=ok
  [ "$rc" = 0 ] || status=failed
  local why=""
  [ "$rc" = 124 ] && status=timeout && why="stopped at ${limit} s"
  [ "$name" = cuda ] && [ "$rc" != 0 ] && why="no CUDA device"
  record "$name" "$status" "$rc" "$wall" "$why"
  return "$rc"
}

install_wheels() {
  if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || return
  fi
}
export py out
step install 20 120 install_wheels
if [ -d .whl ]; then export PYTHONPATH=/tmp/site:$PWD; else export PYTHONPATH=$PWD; fi

cuda_check() {
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" 2>/dev/null
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
}
step cuda 5 60 cuda_check || gpu_ok=0

# The CUDA tests: graphed equals eager on every case, exact graph counts, no capture warning.
step cuda_tests 60 240 '"$py" -m pytest -q -p no:cacheprovider tests/test_graphs.py -k cuda \
  --junitxml="$out/cuda_tests.xml" > "$out/cuda_tests.log" 2>&1'
tail -3 "$out/cuda_tests.log" 2>/dev/null

# The SPEC configuration with 5 seeds: eager against graphed steps, kernels per step.
step bench_5_seeds 60 180 '"$py" -m poh_tune.bench --device cuda --seeds 5 --epochs 3 \
  > "$out/bench_5_seeds.json" 2> "$out/bench_5_seeds.log"'

# Eleven configurations x 5 seeds trained together.
step bench_pack_11 60 180 '"$py" -m poh_tune.bench --device cuda --seeds 5 --pack 11 \
  --epochs 2 > "$out/bench_pack_11.json" 2> "$out/bench_pack_11.log"'

# The document's whole grid, 100 epochs, through the real launcher on one GPU (Ray start and
# report included): the wall time is the step's.
grid() {
  "$py" -m poh_tune.launch grid epochs=100 --gpus-per-trial 0.2 --cpus-per-trial 3 \
    --storage "$out/runs" --name document_grid > "$out/grid.log" 2>&1
  local rc=$?
  cp "$out/runs/document_grid/report.md" "$out/" 2>/dev/null
  return $rc
}
step grid 120 600 grid

summarise
echo "figures: $out/gpu_check.json"
