#!/usr/bin/env bash
# Rebuilds the two bundled models from the shared data, in one command:
#
#   bash Training/reproduce_bundled_models.sh [SHARED_DATA_DIR] [WORK_DIR]
#
# 1. prepare: every real CT slice in the shared data (unlabeled/ and the images of the three labelled
#    CTs; no labels) at 64 x 64 (6.4 mm) and at 128 x 128 (3.2 mm), the default 41 cm field of view;
# 2. pretrain at 64 px: preset small, 3000 iterations of batch 8 (about an hour on 2 CPU cores), EMA
#    0.999 with the default warm-up (0.9999 alone averages over ~10k steps, longer than these runs);
# 3. grow to 128 px: the 64 px EMA weights start a second run on the 128 px slices (--init; the U-Net
#    is convolutional and its attention sits at fixed downsampling factors, so the weights fit), 800
#    iterations of batch 8 (about 55 minutes on 2 CPU cores);
# 4. export that run's EMA weights as "ddpm-pretrained-800", the start of step 5;
# 5. continue at 128 px: a second 128 px run started from ddpm-pretrained-800 (--init) on a 4000-iteration
#    schedule (Adam 2e-4 -> 2e-5), paused after 3200 iterations (--stop-at; about 3 hours on 2 CPU cores),
#    exported (float16) as the bundled "ddpm-pretrained": 4000 iterations at 128 px in all;
# 6. fine-tune it with FT-dec on every labelled slice of the three labelled CTs, abdomen-ct-ircadb01 with its
#    four organs as partial labels (--organs: its other organs are neither learned nor taught as background),
#    fresh augmentation every iteration, backbone lr 1e-4, batch 8, 300 iterations, then 500 more from that model
#    (finetune --base, the same settings; 800 in all) -> "flare22-segmentor" (float16);
# 7. held-out figures (Training.benchmarks.model_figures: leave one patient out over the three, both stages of
#    step 6's recipe trained on the other two, with and without cleanup; four painted slices of the held-out
#    patient from the second stage's model and from ddpm-pretrained) and the cards (Training.model_cards);
# 8. install both into DiffusionSegLib/weights and segment abdomen-ct-a with the default model.
#
# Steps 2, 3 and 5 are resumable: rerunning the script continues a stopped run. Everything runs on the CPU
# unless a GPU is present. Wall times on 2 CPU cores are in the model cards. Held-out figures come from
# python -m Training.benchmarks.model_figures (see README).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared="${1:-$here/../shared/data}"
work="${2:-$here/runs/bundled}"
weights="$here/DiffusionSegLib/weights"
mkdir -p "$work"

for needed in "$shared/unlabeled" "$shared/abdomen-ct-a/ct.nii.gz" "$shared/abdomen-ct-a/labels.nii.gz" \
              "$shared/abdomen-ct-c/ct.nii.gz" "$shared/abdomen-ct-c/labels.nii.gz" \
              "$shared/abdomen-ct-ircadb01/ct.nii.gz" "$shared/abdomen-ct-ircadb01/labels.nii.gz"; do
    [ -e "$needed" ] || { echo "missing $needed: pass the shared data folder as the first argument" >&2; exit 2; }
done
images=("$shared/unlabeled" "$shared/abdomen-ct-a/ct.nii.gz" "$shared/abdomen-ct-c/ct.nii.gz" "$shared/abdomen-ct-ircadb01/ct.nii.gz")

diffusionseg-train prepare "${images[@]}" -o "$work/slices64" --size 64 --workers 2
diffusionseg-train prepare "${images[@]}" -o "$work/slices128" --size 128 --workers 2

pretrain() {  # DATA OUT ITERATIONS [more flags]: resumes OUT when it already holds checkpoints
    local data="$1" out="$2" iterations="$3"; shift 3
    local resume=()
    [ -d "$out/checkpoints" ] && resume=(--resume)
    diffusionseg-train pretrain --data "$data" --out "$out" --preset small --iterations "$iterations" --batch-size 8 \
        --ema-decay 0.999 --checkpoint-every 100 --sample-every 0 --workers 1 --no-progress "${resume[@]}" "$@"
}
pretrain "$work/slices64" "$work/pretrain64" 3000
diffusionseg-train export --run "$work/pretrain64" -o "$work/ddpm-pretrained-64" --name ddpm-pretrained-64
pretrain "$work/slices128" "$work/pretrain128" 800 --init "$work/ddpm-pretrained-64"

diffusionseg-train export --run "$work/pretrain128" -o "$work/ddpm-pretrained-800" --name ddpm-pretrained --half
pretrain "$work/slices128" "$work/pretrain128b" 4000 --init "$work/ddpm-pretrained-800" --stop-at 3200
diffusionseg-train export --run "$work/pretrain128b" -o "$work/ddpm-pretrained" --name ddpm-pretrained --half
diffusionseg-train sample --model "$work/ddpm-pretrained" -n 16 -o "$work/samples" --sampler ddim --steps 100

echo '{"cache_copies": 0}' > "$work/fresh-augmentation.json"
labelled=(--image "$shared/abdomen-ct-a/ct.nii.gz" --labels "$shared/abdomen-ct-a/labels.nii.gz" --organs all
          --image "$shared/abdomen-ct-c/ct.nii.gz" --labels "$shared/abdomen-ct-c/labels.nii.gz" --organs all
          --image "$shared/abdomen-ct-ircadb01/ct.nii.gz" --labels "$shared/abdomen-ct-ircadb01/labels.nii.gz"
          --organs "liver,right kidney,spleen,left kidney")
[ -f "$work/flare22-segmentor-300/model.json" ] || diffusionseg finetune --base "$work/ddpm-pretrained" --strategy ft-dec "${labelled[@]}" \
    --iterations 300 --batch-size 8 --lr 1e-4 --patience 0 --config "$work/fresh-augmentation.json" \
    --half --name flare22-segmentor -o "$work/flare22-segmentor-300" --progress none
[ -f "$work/flare22-segmentor/model.json" ] || diffusionseg finetune --base "$work/flare22-segmentor-300" --strategy ft-dec "${labelled[@]}" \
    --iterations 500 --batch-size 8 --lr 1e-4 --patience 0 --config "$work/fresh-augmentation.json" \
    --half --name flare22-segmentor -o "$work/flare22-segmentor" --progress none

# Held-out figures (about five hours on 2 CPU cores; resumable): leave one patient out over the three.
cts=(--ct abdomen-ct-a "$shared/abdomen-ct-a/ct.nii.gz" "$shared/abdomen-ct-a/labels.nii.gz"
     --ct abdomen-ct-c "$shared/abdomen-ct-c/ct.nii.gz" "$shared/abdomen-ct-c/labels.nii.gz"
     --ct abdomen-ct-ircadb01 "$shared/abdomen-ct-ircadb01/ct.nii.gz" "$shared/abdomen-ct-ircadb01/labels.nii.gz"
     --organs abdomen-ct-a all --organs abdomen-ct-c all)
python -m Training.benchmarks.model_figures --pretrained "$work/ddpm-pretrained" "${cts[@]}" -o "$work/figures-loo" --cases leave-out \
    --segmentor-iterations 300 --segmentor-continue 500
python -m Training.benchmarks.model_figures --pretrained "$work/ddpm-pretrained" "${cts[@]}" -o "$work/figures-loo" --cases four-slice \
    --strategies ft-dec

# Cards: data sources and licences, the earlier stages (64 px, the first 128 px run), held-out metrics;
# cleanup on (it raised held-out DSC in every fold). The first call completes ddpm-pretrained-800's card, which the
# second keeps as the bundled backbone's history; the segmentor's card is written from the leave-one-out figures.
python -m Training.model_cards --pretrained "$work/ddpm-pretrained-800" --grown-from "$work/ddpm-pretrained-64/model.json"
python -m Training.model_cards --pretrained "$work/ddpm-pretrained" --grown-from "$work/ddpm-pretrained-800/model.json"
python -m Training.model_cards --segmentor "$work/flare22-segmentor" --figures "$work/figures-loo/figures.json" --cleanup

mkdir -p "$weights"
for model in ddpm-pretrained flare22-segmentor; do
    rm -rf "$weights/.$model.new" && cp -r "$work/$model" "$weights/.$model.new"
    rm -rf "$weights/$model" && mv "$weights/.$model.new" "$weights/$model"
done
du -sh "$weights"/*

diffusionseg segment "$shared/abdomen-ct-a/ct.nii.gz" -o "$work/abdomen-ct-a.seg.nrrd" --progress none
diffusionseg evaluate --pred "$work/abdomen-ct-a.seg.nrrd" --ref "$shared/abdomen-ct-a/labels.nii.gz" --json "$work/abdomen-ct-a-metrics.json"
