#!/usr/bin/env bash
# Rebuilds the two bundled models from the shared data, in one command:
#
#   bash Training/reproduce_bundled_models.sh [SHARED_DATA_DIR] [WORK_DIR]
#
# 1. prepare: the unlabeled real CT (../shared/data/unlabeled) -> 64 x 64 slices (6.4 mm, the
#    default 41 cm field of view), the size the CPU can pretrain to a plateau in about an hour;
# 2. pretrain: preset small, 3000 iterations of batch 8, EMA 0.999 with the default warm-up
#    (decay min(0.999, (1+n)/(10+n)), 0.997 at the end: 0.9999 alone averages over ~10k steps, longer
#    than this run), every other setting the method's default; resumable: rerunning the script
#    continues a stopped run;
# 3. export the EMA weights (float16) as "ddpm-pretrained";
# 4. fine-tune FT-dec on every labelled slice of abdomen-ct-a -> "flare22-segmentor" (float16);
# 5. install both into DiffusionSegLib/weights and segment abdomen-ct-a with the default model.
#
# Everything runs on the CPU unless a GPU is present. Wall times on 2 CPU cores are in the model cards.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared="${1:-$here/../shared/data}"
work="${2:-$here/runs/bundled}"
weights="$here/DiffusionSegLib/weights"
mkdir -p "$work"

for needed in "$shared/unlabeled" "$shared/abdomen-ct-a/ct.nii.gz" "$shared/abdomen-ct-a/labels.nii.gz"; do
    [ -e "$needed" ] || { echo "missing $needed: pass the shared data folder as the first argument" >&2; exit 2; }
done

diffusionseg-train prepare "$shared/unlabeled" -o "$work/slices64" --size 64 --workers 2

resume=()
[ -d "$work/pretrain/checkpoints" ] && resume=(--resume)
diffusionseg-train pretrain --data "$work/slices64" --out "$work/pretrain" --preset small --iterations 3000 --batch-size 8 \
    --ema-decay 0.999 --checkpoint-every 250 --sample-every 500 --sample-count 16 --sample-steps 50 --workers 1 --no-progress "${resume[@]}"

diffusionseg-train export --run "$work/pretrain" -o "$work/ddpm-pretrained" --name ddpm-pretrained --half
diffusionseg-train sample --model "$work/ddpm-pretrained" -n 32 -o "$work/samples" --steps 100

diffusionseg finetune --base "$work/ddpm-pretrained" --strategy ft-dec \
    --image "$shared/abdomen-ct-a/ct.nii.gz" --labels "$shared/abdomen-ct-a/labels.nii.gz" \
    --iterations 1500 --batch-size 8 --patience 150 --half --name flare22-segmentor -o "$work/flare22-segmentor" --progress none

mkdir -p "$weights"
for model in ddpm-pretrained flare22-segmentor; do
    rm -rf "$weights/.$model.new" && cp -r "$work/$model" "$weights/.$model.new"
    rm -rf "$weights/$model" && mv "$weights/.$model.new" "$weights/$model"
done
du -sh "$weights"/*

diffusionseg segment "$shared/abdomen-ct-a/ct.nii.gz" -o "$work/abdomen-ct-a.seg.nrrd" --progress none
diffusionseg evaluate --pred "$work/abdomen-ct-a.seg.nrrd" --ref "$shared/abdomen-ct-a/labels.nii.gz" --json "$work/abdomen-ct-a-metrics.json"

# The segmentor's card records how it scores on the CT it was trained on (a sanity figure; the
# label-efficiency benchmark in docs/ is the honest measure) and points to that benchmark.
python - "$weights/flare22-segmentor" "$work/abdomen-ct-a-metrics.json" <<'PY'
import json, sys
from DiffusionSegLib.models import read_card, read_weights, save_model
folder, metrics_file = sys.argv[1], sys.argv[2]
metrics = json.load(open(metrics_file))
card = read_card(folder)
card.provenance["metrics"] = {
    "abdomen-ct-a (training CT, all labelled slices)": {"mean_dsc": metrics["mean_dsc"], "mean_jaccard": metrics["mean_jaccard"],
                                                        "organ_dsc": {k: v["dsc"] for k, v in metrics["organs"].items()}},
    "held-out evaluation": "docs/label-efficiency/report.md (FT-dec from this pretrained model, held-out slices)",
}
save_model(folder, card, read_weights(folder), half=True)
PY
