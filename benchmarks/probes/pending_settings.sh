#!/usr/bin/env bash
# The GPU runs that decide the kernel settings MAD still leaves off (benchmarks/NOTES-gpu.md 40-48), in the
# order of what they decide, each one time-boxed so that a short lease still brings back the first ones.
#
#     OUT=DIR [BUDGET=SECONDS] bash benchmarks/probes/pending_settings.sh [PART ...]
#
# PART (default: all, in this order):
#   tests     the GPU tests of the folds, the 4-bit kernel and the mLSTM step (those never run on a GPU)
#   bf16      bf16 decode, five models on the same weights: FOLD_NORM, linear SHARED_X, SPLITS, TX x TY
#   q4        4-bit decode, five models: AHEAD, NORM_FOLD_WIDTH, qlinear SHARED_X, SPLITS
#   qmv       the 4-bit product alone per launch setting (features:ahead:warps[:shared]) and tensor cores
#   nsys      100 decode steps (4-bit, then bf16) under Nsight Systems: kernel time, MLX's host time
#   sweep     the mLSTM step kernel alone: layouts x row splits, batch 1 and 32
#   e2e       bf16 and 4-bit decode end to end (build, evaluation, bytes floor)
#   prompt    PROMPT_ADDMM off / on / off / on, 16k first token and 65k prefill
#   decode32  PROMPT_ADDMM off / on / off / on, batch-32 decode
# Each part writes its output under OUT and a line "part exit-status seconds-left" to OUT/times.txt.
# FOLD_TESTS, if set, is a pytest -k expression for tests/test_fold.py (to leave out what a lease on the same
# kernels has passed). BUDGET (default 570) is the seconds the whole run may take; a part starts only with 30 s left and is
# cut at what is left.
set -u
if [ -z "${OUT:-}" ]; then
    echo "pending_settings.sh: set OUT to a folder for the results" >&2
    exit 2
fi
BUDGET=${BUDGET:-570}
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
    echo "pending_settings.sh: BUDGET must be a number of seconds, got '$BUDGET'" >&2
    exit 2
fi
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
L=mad.kernels.linear_device Q=mad.kernels.qlinear_device S=mad.kernels.mlstm_device
PROBE=benchmarks/probes/gpu_decode_probe.py

# run NAME LIMIT COMMAND...: COMMAND with at most LIMIT seconds (less if less is left), stdout and stderr
# to OUT/NAME.txt
run() {
    local name=$1 limit=$2 budget
    shift 2
    budget=$(left)
    if [ "$budget" -lt 30 ]; then
        echo "$name skipped $budget" >> "$OUT/times.txt"
        return
    fi
    [ "$limit" -gt "$budget" ] && limit=$budget
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name $? $(left)" >> "$OUT/times.txt"
}

part_tests() {
    local pytest="python -m pytest -q -p no:cacheprovider --maxfail=5"
    run test_fold 200 $pytest tests/test_fold.py ${FOLD_TESTS:+-k "$FOLD_TESTS"}
    run test_qlinear_kernel 150 $pytest tests/test_qlinear_kernel.py
    run test_kernels 120 $pytest tests/test_kernels.py -k "mlstm_step or decode or neighbouring"
}

part_bf16() {
    run bf16_settings 200 python $PROBE --steps 40 \
        --compare-setting $L.FOLD_NORM=False,False,True,True,True \
        --compare-setting $L.SHARED_X=False,True,True,True,True \
        --compare-setting $S.SPLITS=1,1,1,4,1 \
        --compare-setting $S.TX=128,128,128,128,32 \
        --compare-setting $S.TY=4,4,4,4,16
}

part_q4() {
    run q4_settings 200 python $PROBE --steps 40 --bits 4 \
        --compare-setting $Q.AHEAD=0,1,1,1,1 \
        --compare-setting $L.NORM_FOLD_WIDTH=0,0,256,256,256 \
        --compare-setting $Q.SHARED_X=False,False,False,True,True \
        --compare-setting $S.SPLITS=1,1,1,1,4
}

part_qmv() {
    run qmv 150 python benchmarks/probes/gpu_qmv.py --bits 4 --rows 1 \
        --configs fma 4:0:4 4:1:4 4:2:4 4:1:4:1 2:1:4:1 mma
}

part_nsys() {
    local nsys
    nsys=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
    if [ -z "$nsys" ]; then
        echo "nsys not found" >> "$OUT/times.txt"
        return
    fi
    for bits in 4 16; do
        local args=()
        [ $bits = 4 ] && args=(--bits 4)
        run nsys_$bits 120 "$nsys" profile --capture-range=cudaProfilerApi --trace=cuda,nvtx --sample=none \
            --cpuctxsw=none -f true -o /tmp/mad_decode_$bits python $PROBE --profile-steps 100 "${args[@]}"
        run nsys_${bits}_stats 60 "$nsys" stats --report cuda_gpu_kern_sum --report nvtx_sum \
            --report cuda_api_sum --format csv --output "$OUT/nsys_$bits" /tmp/mad_decode_$bits.nsys-rep
    done
}

part_sweep() {
    run sweep 90 python benchmarks/probes/sweep_mlstm_step.py --batch 1,32 --layouts 128x4x16,32x16x16 \
        --splits 1,2,4,8 --chain 20 --trials 10
}

part_e2e() {
    run e2e_bf16 120 python $PROBE --steps 40
    run e2e_q4 120 python $PROBE --steps 40 --bits 4
}

part_prompt() {
    for value in False True False True; do
        run prompt_addmm_${value}_$(date +%s) 280 python benchmarks/gpu_targets.py --only long,prefill \
            --setting $L.PROMPT_ADDMM=$value
    done
}

part_decode32() {
    for value in False True False True; do
        run decode32_addmm_${value}_$(date +%s) 140 python benchmarks/gpu_targets.py --only decode32 \
            --setting $L.PROMPT_ADDMM=$value
    done
}

PARTS=(tests bf16 q4 qmv nsys sweep e2e prompt decode32)
[ $# -gt 0 ] && PARTS=("$@")
for part in "${PARTS[@]}"; do   # every part checked before anything is written
    if ! declare -F "part_$part" > /dev/null; then
        echo "pending_settings.sh: unknown part '$part' (parts: tests bf16 q4 qmv nsys sweep e2e prompt decode32)" >&2
        exit 2
    fi
done
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/card.txt" 2>&1
echo "start $(date -u +%FT%TZ) budget $BUDGET" >> "$OUT/times.txt"
for part in "${PARTS[@]}"; do
    "part_$part"
done
