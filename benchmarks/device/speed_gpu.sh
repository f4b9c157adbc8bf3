#!/usr/bin/env bash
# benchmarks/speed.py on a lent GPU: three short runs, each under its own time limit so that what finished comes
# back even if a later run fails (a compile error must not cost the eager figures). Nothing is downloaded: the
# networks are random-weight SD-1.5-sized and no-prior-sized models built from the shipped configs.
#
# Prepared here with `bash benchmarks/device/stage.sh` (only its wheels are needed), then run as
#   run(command="bash benchmarks/device/speed_gpu.sh", carry=[".whl"], timeout_s=540)
# Results: $OUT/<run>/results.json and results.md per run, $OUT/summary.md (all of them), $OUT/nvidia-smi.txt,
# $OUT/<run>.log. Settings (environment variables, defaults in brackets):
#   SD15_ARGS ["--model sd15 --train"]                          eager: reference vs fast, training batch 1..32
#   COMPILE_ARGS ["--model sd15 --compile --reference_slices 4"]  torch.compile of the UNet and the VAE
#   NO_PRIOR_ARGS ["--model no_prior --train --train_batches 1 8 32"]
#   COMMON_ARGS [""]: appended to every run (later arguments win); a run whose ARGS is "skip" is skipped
#   SD15_LIMIT [180] COMPILE_LIMIT [210] NO_PRIOR_LIMIT [60]: seconds per run   WHEEL_DIR [.whl]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
start=$SECONDS

OUT=${OUT:-outputs/device}
WHEEL_DIR=${WHEEL_DIR:-.whl}
SD15_ARGS=${SD15_ARGS:-"--model sd15 --train"}
COMPILE_ARGS=${COMPILE_ARGS:-"--model sd15 --compile --reference_slices 4"}
NO_PRIOR_ARGS=${NO_PRIOR_ARGS:-"--model no_prior --train --train_batches 1 8 32"}
COMMON_ARGS=${COMMON_ARGS:-}
mkdir -p "$OUT"

if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEEL_DIR"/*.whl \
        || { echo "speed_gpu.sh: installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi on this machine" >"$OUT/nvidia-smi.txt"

status=0
: >"$OUT/summary.md"
run_one() {  # name, limit, args
    local name=$1 limit=$2 args=$3
    if [ "$args" = "skip" ]; then
        echo "--- $name: skipped"
        return
    fi
    echo "--- $name (at most ${limit}s): python3 benchmarks/speed.py $args $COMMON_ARGS"
    # shellcheck disable=SC2086  # the ARGS variables are lists of arguments
    PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=15 "$limit" \
        python3 benchmarks/speed.py $args $COMMON_ARGS --output_dir "$OUT/$name" >"$OUT/$name.log" 2>&1
    local rc=$?
    if [ -f "$OUT/$name/results.md" ]; then
        cat "$OUT/$name/results.md" >>"$OUT/summary.md"
        echo >>"$OUT/summary.md"
    fi
    if [ "$rc" -ne 0 ]; then
        echo "$name: exit $rc (124: stopped at the time limit; 1: fast path beyond tolerance); log tail:"
        tail -n 15 "$OUT/$name.log"
        status=1
    else
        tail -n 3 "$OUT/$name.log"
    fi
}
run_one sd15 "${SD15_LIMIT:-180}" "$SD15_ARGS"
run_one no_prior "${NO_PRIOR_LIMIT:-60}" "$NO_PRIOR_ARGS"
run_one sd15_compile "${COMPILE_LIMIT:-210}" "$COMPILE_ARGS"
cat "$OUT/summary.md"
echo "total $((SECONDS - start)) s"
exit "$status"
