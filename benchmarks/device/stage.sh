#!/usr/bin/env bash
# Stage, on this machine, what `benchmarks/device/no_prior_h100.sh` needs on the GPU machine, which
# sees only the repository and has no package index: the wheels its image lacks (.whl/) and the
# dataset (.data/<name>/). Both folders are git-ignored; name them in the device call's `carry`.
#
# Usage (repository root or anywhere):  bash benchmarks/device/stage.sh [DATASET_DIR]
#   DATASET_DIR  an ALPNet-layout dataset (image_N, label_N, supervoxels_5000/);
#                default ../shared/data/chaos_t2spir
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

dataset_dir=${1:-../shared/data/chaos_t2spir}
# Versions this project is tested with; the device image already has torch, transformers,
# huggingface_hub, safetensors, numba, scipy, scikit-image, tqdm, zipp, pillow, requests and regex.
wheels=(monai==1.6.1 diffusers==0.42.1 pytorch-ignite==0.5.5 nibabel==5.4.2 importlib_metadata==8.7.0)
limit_bytes=$((64 * 1024 * 1024))

for required in image_ label_; do
    if ! compgen -G "$dataset_dir/${required}*.nii.gz" >/dev/null; then
        echo "stage.sh: '$dataset_dir' has no ${required}N.nii.gz files (ALPNet layout expected)." >&2
        exit 2
    fi
done
if [ ! -d "$dataset_dir/supervoxels_5000" ]; then
    echo "stage.sh: '$dataset_dir/supervoxels_5000' is missing; make it with 'python -m monai_sdfsmis supervoxels'." >&2
    exit 2
fi

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${wheels[@]}"

name=$(basename "$(cd "$dataset_dir" && pwd)")
target=.data/$name
rm -rf "$target.partial"
mkdir -p "$target.partial/supervoxels_5000"
cp "$dataset_dir"/image_*.nii.gz "$dataset_dir"/label_*.nii.gz "$target.partial/"
cp "$dataset_dir"/supervoxels_5000/*.nii.gz "$target.partial/supervoxels_5000/"
rm -rf "$target"
mv "$target.partial" "$target"

tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .whl .data | tail -1 | cut -f1)
total=$((tracked + carried))
echo "staged: .whl ($(ls .whl | wc -l) wheels) and $target; with the tracked files $((total / 1048576)) MiB of the 64 MiB a device call carries"
if [ "$total" -gt "$limit_bytes" ]; then
    echo "stage.sh: too large for one device call; stage fewer files or drop an unneeded wheel." >&2
    exit 1
fi
