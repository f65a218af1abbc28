#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU, a recent PyTorch and no network:
#
#     bash benchmarks/gpu_check.sh [RESULTS_DIR]                  # default: benchmarks/results/gpu
#     WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh         # default: benchmarks/wheels
#     GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh            # no GPU: every step on the CPU at toy sizes (a temp dir)
#
# 1. installs any missing Python package, and a newer transformers over an older one, from the wheels in one folder
#    ($WHEELS), never from an index: transformers is required; torchao is optional (without it its column is skipped);
# 2. then, most wanted first, each step only if its estimated time still fits the budget (GPU_CHECK_BUDGET_S,
#    default 330 s, so that the whole script stays under 6 minutes on an H200; a step that does not fit is listed
#    as SKIPPED, one that runs out of budget is stopped):
#      compile_check     compiled gradients = eager ones on CUDA (the LSQ op, a layer, a tiny ViT; inductor, aot_eager)
#      vit_eager         speed.py, ViT-B/16 224x224 batch 64 bf16, eager: fp, qat, saq, looksam and the peers
#      vit_compiled      the same compiled (torch_compile=True): fp, qat, saq, looksam
#      convnext_eager    speed.py, ConvNeXt-T 224x224 batch 64 bf16, eager: fp, qat, saq, looksam and the peers
#      bit_identity      the LSQ op (fused kernels, multi-tensor weights) bit for bit against its reference on CUDA
#      cudagraphs        torch_compile_mode="reduce-overhead" against eager, every mode and strategy (gpu_checks.py)
#      vit_cudagraphs    speed.py, ViT-B/16 with CUDA graphs: fp, qat, saq, looksam
#      gpu_checks        SAQ in bf16/fp16 on tiny models, compiled against eager (gpu_checks.py)
#      profile           where a bf16 ViT-B/16 step's host and device time goes (profile_step.py)
# Writes a log per step, JSON + PNG per speed run and summary.txt to RESULTS_DIR (and copies the summary and an
# archive of everything to $OUT when that is set).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
# A dry run's toy figures never land in the GPU results by default.
if [ "$DRY_RUN" = 1 ]; then RESULTS="${1:-$(mktemp -d -t gpu_check_dry.XXXXXX)}"; else RESULTS="${1:-$REPO/benchmarks/results/gpu}"; fi
WHEELS="${WHEELS:-$HERE/wheels}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-330}"
PYTHON="${PYTHON:-$(command -v python >/dev/null && echo python || echo python3)}"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
# SAQ_HF_NATIVE_KERNELS=0: the checks are about CUDA; building the LSQ op's C++ CPU kernels (~20 s) for the few CPU
# references would spend the budget (the dry run keeps them: that is a CPU run).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
[ "$DRY_RUN" = 1 ] || export SAQ_HF_NATIVE_KERNELS=0
cd "$REPO"
log() { echo "[gpu_check ${SECONDS}s] $*" | tee -a "$SUMMARY"; }
: > "$SUMMARY"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then log "$PYTHON cannot import torch (set PYTHON=...)"; exit 2; fi
if [ "$DRY_RUN" = 1 ]; then
    log "DRY RUN: CPU, toy sizes; the figures mean nothing, the steps and their outputs are what is checked (in $RESULTS)"
elif ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device visible to torch: nothing to check (GPU_CHECK_DRY_RUN=1 tries the script on a CPU)"; exit 2
else
    log "$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| cuda', torch.version.cuda)")"
fi

# --- 1. packages: module name -> distribution name, from $WHEELS only
install() {  # install DIST: from the wheel folder, with its dependencies, else the wheel alone
    [ -d "$WHEELS" ] || return 1
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "$1" 2>/dev/null && return 0
    "$PYTHON" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$1" 2>/dev/null
}
for pair in transformers:transformers accelerate:accelerate safetensors:safetensors matplotlib:matplotlib \
            pytest:pytest yaml:pyyaml PIL:pillow huggingface_hub:huggingface_hub torchao:torchao; do
    module="${pair%%:*}"; dist="${pair##*:}"
    if ! "$PYTHON" -c "import $module" 2>/dev/null; then
        if install "$dist" && "$PYTHON" -c "import $module" 2>/dev/null; then
            log "installed $dist from $WHEELS"
        else
            log "SKIPPED $dist: not importable and no usable wheel in $WHEELS$([ "$dist" = torchao ] && echo ' (the torchao column is skipped)')"
        fi
    fi
done
# A newer transformers wheel in $WHEELS replaces an older installed one (an image's may predate saq-hf's tested one).
if compgen -G "$WHEELS/transformers-*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --find-links "$WHEELS" transformers 2>/dev/null \
        || log "could not install the transformers wheel from $WHEELS"
fi
if ! "$PYTHON" -c "import transformers" 2>/dev/null; then log "transformers is required: put its wheel in $WHEELS"; exit 2; fi
log "$("$PYTHON" -c "import transformers; print('transformers', transformers.__version__)")"

remaining() { echo $((BUDGET_S - SECONDS)); }
step() {  # step NAME MIN_SECONDS COMMAND...: run COMMAND if MIN_SECONDS still fit the budget
    local name="$1" need="$2"; shift 2
    if [ "$(remaining)" -lt "$need" ]; then log "SKIPPED $name (needs ~${need}s, $(remaining)s of the budget left)"; return; fi
    log "start $name"
    timeout --signal=INT "$(remaining)" "$@" > "$RESULTS/$name.log" 2>&1
    local status=$?
    log "done $name: exit $status$([ $status = 124 ] && echo ' (stopped: out of budget)') ($(grep -E '^(goals|[0-9]+/[0-9]+ checks|[0-9]+ passed|FAILED|.* failed|compiled matches eager)' "$RESULTS/$name.log" | tail -2 | tr '\n' ' '))"
}
speed() {  # speed NAME MIN_SECONDS SPEED_ARGS...
    local name="$1" need="$2"; shift 2
    step "$name" "$need" "$PYTHON" benchmarks/speed.py --out "$RESULTS/$name.json" "${SPEED_SIZE[@]}" "$@"
    grep -A 3 '^config' "$RESULTS/$name.log" 2>/dev/null | tee -a "$SUMMARY"
}

# --- 2. the checks, most wanted first. Estimates on an H200: the compiles are most of the time.
EAGER=fp,qat,saq,looksam,torchao_qat,torch_lsq
COMPILED=fp_compiled,qat_compiled,saq_compiled,looksam_compiled
CUDAGRAPHS=fp_cudagraphs,qat_cudagraphs,saq_cudagraphs,looksam_cudagraphs
if [ "$DRY_RUN" = 1 ]; then
    SPEED_SIZE=(--steps 2 --warmup 1 --quick); VIT=vit-tiny; CONVNEXT=convnext-tiny; COMPILED=fp_compiled
    CUDAGRAPHS=fp_cudagraphs; COMPILE_CHECK=(--devices cpu --backends aot_eager); DEVICE_TESTS="cpu-float32"
    GPU_CHECKS=(--dry-run)
else
    SPEED_SIZE=(--steps 10 --warmup 3); VIT=vit-b16; CONVNEXT=convnext-tiny; COMPILE_CHECK=(); DEVICE_TESTS="cuda"
    GPU_CHECKS=()
fi
step compile_check 45 "$PYTHON" benchmarks/compile_check.py "${COMPILE_CHECK[@]}"
speed vit_eager 50 --bf16 --configs "$VIT" --modes "$EAGER"
speed vit_compiled 120 --bf16 --configs "$VIT" --modes "$COMPILED"
speed convnext_eager 40 --bf16 --configs "$CONVNEXT" --modes "$EAGER"
step bit_identity 25 "$PYTHON" -m pytest -q -p no:cacheprovider --noconftest -k "$DEVICE_TESTS" \
    tests/test_fused_quant.py tests/test_multi_tensor_quant.py
step cudagraphs 60 "$PYTHON" benchmarks/gpu_checks.py --checks cudagraphs --out "$RESULTS/cudagraphs.json" \
    "${GPU_CHECKS[@]}"
speed vit_cudagraphs 120 --bf16 --configs "$VIT" --modes "$CUDAGRAPHS"
if [ "$DRY_RUN" = 1 ]; then
    log "SKIPPED gpu_checks, profile (dry run: they need CUDA)"
else
    step gpu_checks 60 "$PYTHON" benchmarks/gpu_checks.py --checks op,numerics,compiled --out "$RESULTS/gpu_checks.json"
    step profile 40 "$PYTHON" benchmarks/profile_step.py --bf16 --out "$RESULTS/profile_vit-b16_bf16.txt"
fi

log "finished in ${SECONDS}s; results in $RESULTS"
# $OUT (the device tool's return folder) takes few files: the summary, and everything else as one archive.
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    cp "$SUMMARY" "$OUT"/ && tar czf "$OUT/gpu_results.tgz" -C "$RESULTS" .
fi
