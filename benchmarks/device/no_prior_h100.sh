#!/usr/bin/env bash
# The no-prior benchmark on a lent GPU, one fold per device call by default, alone on the GPU, so that
# its training time measures something (folds side by side each get a share of the GPU); stopped in
# time for the results to come back. Fold 0 first; later calls run FOLDS=1, 2, ... and
# `python benchmarks/no_prior_protocol.py --merge DIR...` joins folds measured in different calls.
#
# Prepared here with `bash benchmarks/device/stage.sh`, then run through the device tool as
#   run(command="bash benchmarks/device/no_prior_h100.sh", carry=[".whl", ".data"], timeout_s=600)
#   run(command="FOLDS=1 bash benchmarks/device/no_prior_h100.sh", carry=[".whl", ".data"], timeout_s=600)
# The merged results.json / results.md, a nvidia-smi listing and runs.tar.gz (per-fold logs, results and
# per-case CSVs; no weights) land in $OUT. Each fold is `python -m monai_sdfsmis train --preset gpu` (the product's
# recipe), driven by benchmarks/no_prior_protocol.py. Settings (environment variables, defaults in brackets):
#   DATASET_DIR [.data/chaos_t2spir]   FOLDS ["0"] (several: trained side by side)
#   MINUTES [8] training minutes of both stages together (the recipe's schedules run over them)
#   DEADLINE [560]: seconds after the start at which unfinished folds are stopped (they report nothing)
#   EXTRA_ARGS: more arguments for benchmarks/no_prior_protocol.py (e.g. --set KEY=VALUE ...)
#   RUN_DIR [/tmp/no_prior_runs]   WHEEL_DIR [.whl]: wheels installed first, when there are any
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
start=$SECONDS

OUT=${OUT:-outputs/device}
DATASET_DIR=${DATASET_DIR:-.data/chaos_t2spir}
FOLDS=${FOLDS:-"0"}
MINUTES=${MINUTES:-8}
DEADLINE=${DEADLINE:-560}
EXTRA_ARGS=${EXTRA_ARGS:-}
RUN_DIR=${RUN_DIR:-/tmp/no_prior_runs}
WHEEL_DIR=${WHEEL_DIR:-.whl}
mkdir -p "$OUT" "$RUN_DIR"

if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEEL_DIR"/*.whl \
        || { echo "no_prior_h100.sh: installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ! -d "$DATASET_DIR" ]; then
    echo "no_prior_h100.sh: dataset '$DATASET_DIR' not found; stage it with benchmarks/device/stage.sh and carry .data" >&2
    exit 2
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi on this machine" >"$OUT/nvidia-smi.txt"

read -r -a folds <<<"$FOLDS"
cores=$(nproc)
# Each fold gets an equal share of the cores: one for its training loop, the rest for data loading.
workers=$((cores / ${#folds[@]} - 1))
[ "$workers" -lt 1 ] && workers=1
if [ "${#folds[@]}" -eq 1 ]; then
    note="fold ${folds[0]} trained alone on the device; $cores CPU cores"
else
    note="${#folds[@]} fold(s) trained at the same time, one process each, on one device; $cores CPU cores shared"
fi
limit=$((DEADLINE - (SECONDS - start)))
echo "folds ${folds[*]}: ${MINUTES} training minutes each, $workers loader workers each, stop after ${limit}s"

pids=()
for k in "${folds[@]}"; do
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of arguments
    OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=20 "$limit" \
        python3 benchmarks/no_prior_protocol.py --dataset_dir "$DATASET_DIR" --output_dir "$RUN_DIR/fold_$k" \
        --folds "$k" --minutes "$MINUTES" --preset gpu --set num_workers="$workers" progress=false \
        --note "$note" $EXTRA_ARGS >"$RUN_DIR/fold_$k.log" 2>&1 &
    pids+=($!)
done
failed=()
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${folds[$i]} (exit $?)")
done
[ "${#failed[@]}" -gt 0 ] && echo "folds that did not finish: ${failed[*]}; see their logs in runs.tar.gz"

finished=()
for k in "${folds[@]}"; do
    [ -f "$RUN_DIR/fold_$k/fold_$k/results.json" ] && finished+=("$RUN_DIR/fold_$k")
done
status=0
if [ "${#finished[@]}" -gt 0 ]; then
    python3 benchmarks/no_prior_protocol.py --merge "${finished[@]}" --output_dir "$RUN_DIR/merged" --note "$note" >"$RUN_DIR/merge.log" 2>&1 \
        && cp "$RUN_DIR/merged/results.json" "$RUN_DIR/merged/results.md" "$OUT/" && cat "$OUT/results.md" \
        || { echo "merging the fold results failed:"; tail -20 "$RUN_DIR/merge.log"; status=1; }
else
    echo "no fold finished"
    status=1
fi
for k in "${folds[@]}"; do echo "--- fold $k log (tail)"; tail -n 6 "$RUN_DIR/fold_$k.log"; done
tar -czf "$OUT/runs.tar.gz" -C "$RUN_DIR" --exclude='*.safetensors' --exclude='*.pt' --exclude='autoencoder' --exclude='*.png' . 2>/dev/null
echo "total $((SECONDS - start)) s"
[ "${#failed[@]}" -gt 0 ] && status=1
exit "$status"
