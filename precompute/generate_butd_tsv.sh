#!/usr/bin/env bash
# Run the original bottom-up-attention detector (Caffe, peteanderson80/bottom-up-attention) on your images and
# import its TSV output. This runs outside maxmatch: it needs that repository built with its Caffe fork, a GPU
# and the Visual Genome ResNet-101 model (resnet101_faster_rcnn_final.caffemodel, linked from its README).
#
#   BUTD_ROOT=~/bottom-up-attention GPUS=0,1 SPLIT=my_split OUT=features/my_images.tsv \
#     CAPTIONS=dataset_mine.json ./precompute/generate_butd_tsv.sh
#
# SPLIT must be a split known to tools/generate_tsv.py: add a branch to its load_image_ids() that lists your
# image files and ids (the ids must be the keys of your Karpathy json: COCO ids, or the numeric file stem).
# Box count: generate_tsv.py keeps MIN_BOXES..MAX_BOXES (10..100) detections above conf_thresh 0.2; set both
# constants to 36 for the fixed-36 features most retrieval papers use. With several GPUs it works in one file
# per GPU next to OUT; the OUT* glob below passes whatever is there (rows of an image seen twice are skipped).
set -euo pipefail
: "${BUTD_ROOT:?set BUTD_ROOT to your bottom-up-attention checkout}"
: "${SPLIT:?set SPLIT to the split name you added to generate_tsv.py}"
: "${OUT:?set OUT to the TSV path to write}"
GPUS="${GPUS:-0}"

cd "$BUTD_ROOT"
python ./tools/generate_tsv.py --gpu "$GPUS" \
  --cfg experiments/cfgs/faster_rcnn_end2end_resnet.yml \
  --def models/vg/ResNet-101/faster_rcnn_end2end_final/test.prototxt \
  --net data/faster_rcnn_models/resnet101_faster_rcnn_final.caffemodel \
  --split "$SPLIT" --out "$OUT"
cd - >/dev/null

if [[ -n "${CAPTIONS:-}" ]]; then
  python precompute/check_tsv.py "$OUT"* --captions "$CAPTIONS"
  maxmatch extract-features tsv "$OUT"* --captions "$CAPTIONS" --out "${OUT%.tsv}.h5"
fi
