#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU, a recent PyTorch + transformers and no network:
#
#     bash benchmarks/gpu_check.sh [RESULTS_DIR]        # default: benchmarks/results/gpu
#
# 1. installs any missing Python package from wheels placed beside this script (benchmarks/wheels/*.whl,
#    or benchmarks/*.whl), never from an index; torchao is optional (its peer column is skipped without it);
# 2. speed.py at ViT-B/16 and ConvNeXt-T size (224x224, batch 64, 10 timed steps): bf16 and fp32, eager and
#    compiled modes and the peers, and the correctness checks: the fused LSQ op bit for bit against the
#    unfused reference on the GPU (fp32, bf16, fp16; pytest tests/test_fused_quant.py), and
#    benchmarks/gpu_checks.py (SAQ in bf16/fp16 on tiny models, compiled against eager). Most wanted first,
#    so a partial run keeps what finished.
# Budget: under 8 minutes on an H100 (the compiles of the *_compiled modes are most of it); a step that no
# longer fits the budget is skipped and listed. Writes JSON + PNG per run and summary.txt to RESULTS_DIR
# (and copies them to $OUT when that is set).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
RESULTS="${1:-$REPO/benchmarks/results/gpu}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-460}"
PYTHON="${PYTHON:-$(command -v python >/dev/null && echo python || echo python3)}"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
cd "$REPO"
log() { echo "[gpu_check ${SECONDS}s] $*" | tee -a "$SUMMARY"; }
: > "$SUMMARY"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then log "$PYTHON cannot import torch (set PYTHON=...)"; exit 2; fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device visible to torch: nothing to check"; exit 2
fi
log "$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| cuda', torch.version.cuda)")"

# --- 1. packages: module name -> distribution name
WHEELS=("$HERE"/wheels "$HERE")
for pair in transformers:transformers accelerate:accelerate safetensors:safetensors matplotlib:matplotlib \
            pytest:pytest yaml:pyyaml datasets:datasets evaluate:evaluate jinja2:jinja2 sklearn:scikit-learn \
            mlxtend:mlxtend PIL:pillow huggingface_hub:huggingface_hub torchao:torchao; do
    module="${pair%%:*}"; dist="${pair##*:}"
    if ! "$PYTHON" -c "import $module" 2>/dev/null; then
        links=(); for w in "${WHEELS[@]}"; do [ -d "$w" ] && links+=(--find-links "$w"); done
        if "$PYTHON" -m pip install -q --no-index "${links[@]}" "$dist" 2>/dev/null; then
            log "installed $dist from the wheels beside gpu_check.sh"
        else
            log "missing $dist (no wheel beside gpu_check.sh)$([ "$dist" = torchao ] && echo ': the torchao column is skipped')"
        fi
    fi
done
log "$("$PYTHON" -c "import transformers; print('transformers', transformers.__version__)")"

remaining() { echo $((BUDGET_S - SECONDS)); }
step() {  # step NAME MIN_SECONDS COMMAND...: run COMMAND if MIN_SECONDS still fit the budget
    local name="$1" need="$2"; shift 2
    if [ "$(remaining)" -lt "$need" ]; then log "SKIPPED $name (needs ~${need}s, $(remaining)s of the budget left)"; return; fi
    log "start $name"
    timeout --signal=INT "$(remaining)" "$@" > "$RESULTS/$name.log" 2>&1
    local status=$?
    log "done $name: exit $status ($(grep -E '^(goals|[0-9]+/[0-9]+ checks|[0-9]+ passed|FAILED|.* failed)' "$RESULTS/$name.log" | tail -2 | tr '\n' ' '))"
}

# --- 2. speed and correctness, most wanted first: the bf16 ViT-B/16 goal row (eager, then compiled), the fused
# op's bit identity on the GPU (CUDA cases; CI covers the CPU ones; tests/conftest.py needs `datasets`, this
# file does not), SAQ's numerics in bf16/fp16, then fp32 and ConvNeXt-T
EAGER=fp,qat,saq,every_k,looksam,reuse_grad,torchao_qat,torch_lsq
speed() {  # speed NAME MIN_SECONDS SPEED_ARGS...
    local name="$1" need="$2"; shift 2
    step "$name" "$need" "$PYTHON" benchmarks/speed.py --steps 10 --out "$RESULTS/$name.json" "$@"
    grep -A 3 '^config' "$RESULTS/$name.log" 2>/dev/null | tee -a "$SUMMARY"
}
speed speed_cuda_bf16_vit-b16 60 --bf16 --configs vit-b16 --modes "$EAGER"
step fused_op_bit_identity 30 "$PYTHON" -m pytest -q -p no:cacheprovider --noconftest -k cuda tests/test_fused_quant.py
step gpu_checks 60 "$PYTHON" benchmarks/gpu_checks.py --out "$RESULTS/gpu_checks.json"
step compile_check 60 "$PYTHON" benchmarks/compile_check.py
step profile_step 40 "$PYTHON" benchmarks/profile_step.py --bf16 --out "$RESULTS/profile_vit-b16_bf16.txt"
speed speed_cuda_bf16_vit-b16_compiled 150 --bf16 --configs vit-b16 --modes fp,qat,saq,fp_compiled,qat_compiled,saq_compiled
speed speed_cuda_fp32_eager 60 --configs vit-b16,convnext-tiny --modes "$EAGER"
speed speed_cuda_bf16_convnext-tiny 60 --bf16 --configs convnext-tiny --modes "$EAGER"

log "finished in ${SECONDS}s; results in $RESULTS"
# $OUT (the device tool's return folder) takes few files: the summary, and everything else as one archive.
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    cp "$SUMMARY" "$OUT"/ && tar czf "$OUT/gpu_results.tgz" -C "$RESULTS" .
fi
