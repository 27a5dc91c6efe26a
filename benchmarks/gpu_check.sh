#!/usr/bin/env bash
# Every GPU figure of the runtime targets in one run: benchmarks/gpu_check.sh OUT_DIR
#
#   runtime_modes.py  peak memory of load + one FluxSpace edit under offload none / model / model+fp8 /
#                     blocks, per-step times, blocks vs resident (flux-dev, 1024 x 1024, full depth,
#                     24-layer T5-XXL-width encoder; $STEPS steps, the 28-step figures derived)
#   forward.py        one forward, ours vs diffusers, eager / whole-model compiled / regional compiled
#   edit_cost.py      a FluxSpace step against a plain step, both compiled (regional)
#   flux2_forward.py  one FLUX.2 step (klein 4B, full size, 1024 x 1024, 512 text tokens): ours eager /
#                     regional compiled / diffusers Flux2Transformer2DModel, same weights (stage flux2_forward)
#   edit_cost.py      the same on FLUX.2 klein 4B: a FluxSpace fine-edit step against a plain one (flux2_edit_cost)
#
# Each writes its JSON (and a .log of its output) into OUT_DIR; gpu_check.json there sums up the
# stages (exit status, seconds). A failing stage does not stop the others; the script exits 1 if any
# failed. It installs nothing: it uses the repository's .venv if there is one, else python3, and
# stops at once if torch (with CUDA), diffusers, transformers or the repo cannot be imported.
#
#   benchmarks/gpu_check.sh --tiny OUT_DIR    (or TINY=1): the same calls at tiny sizes on the CPU
#
# Settings from the environment: STEPS (runtime_modes steps, default 4), MODES (default
# none,model,model+fp8,blocks), FORWARD_SCOPE (whole|regional|both, default both), FORWARD_ITERS
# (default 5), EDIT_ROUNDS (default 3), CKPT_TMP (where the 34 GB random checkpoint set is written,
# default the system's temp folder), CKPT_DIR (keep the set there and reuse it on a rerun), SKIP
# (comma-separated stage names to leave out: runtime_modes,forward,edit_cost,flux2_forward,flux2_edit_cost),
# FLUX2_PRESET (default flux2-klein-4b).
set -euo pipefail

TINY=${TINY:-0}
if [[ "${1:-}" == "--tiny" ]]; then
    TINY=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: $0 [--tiny] OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
STEPS=${STEPS:-4}
MODES=${MODES:-none,model,model+fp8,blocks}
FORWARD_SCOPE=${FORWARD_SCOPE:-both}
FORWARD_ITERS=${FORWARD_ITERS:-5}
EDIT_ROUNDS=${EDIT_ROUNDS:-3}
SKIP=${SKIP:-}
FLUX2_PRESET=${FLUX2_PRESET:-flux2-klein-4b}

echo "gpu_check: $(date -u +%FT%TZ), repo $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), python $PY, tiny=$TINY"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L || true
else
    echo "nvidia-smi: not found"
fi

# Preflight: what the stages import, nothing installed.
if [[ $TINY == 1 ]]; then NEED_CUDA=0; else NEED_CUDA=1; fi
"$PY" - "$NEED_CUDA" <<'EOF'
import sys
missing = []
for name in ("torch", "diffusers", "transformers", "safetensors", "tokenizers", "fluxspace", "flux_core", "weights_tools"):
    try:
        __import__(name)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("gpu_check: cannot import " + "; ".join(missing) + " -- this script installs nothing")
import torch
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, available: {torch.cuda.is_available()}")
if sys.argv[1] == "1":
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device (run with --tiny for the CPU check)")
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.1f} GiB")
EOF

if [[ $TINY == 1 ]]; then
    # Tiny sizes on the CPU: the same scripts and flags, minutes instead of hours.
    STEPS=2 FORWARD_ITERS=2 EDIT_ROUNDS=2
    RUNTIME_ARGS=(--preset tiny --size 64 --steps "$STEPS" --device cpu)
    FORWARD_ARGS=(--preset tiny --height 64 --width 64 --device cpu --warmup 1 --iters "$FORWARD_ITERS")
    EDIT_ARGS=(--preset tiny --height 64 --width 64 --device cpu --rounds "$EDIT_ROUNDS")
    # FLUX.2 has no tiny size: klein 4B's head layout at 256 wide, 1 + 1 blocks.
    FLUX2_ARGS=(--preset "$FLUX2_PRESET" --hidden 256 --heads 2 --height 64 --width 64 --txt-len 16 --device cpu)
    FLUX2_FORWARD_ARGS=("${FLUX2_ARGS[@]}" --width-blocks 1,1 --warmup 1 --iters "$FORWARD_ITERS")
    FLUX2_EDIT_ARGS=("${FLUX2_ARGS[@]}" --depth 1 --depth-single 1 --rounds "$EDIT_ROUNDS")
else
    RUNTIME_ARGS=(--preset flux-dev --size 1024 --steps "$STEPS" --device cuda)
    FORWARD_ARGS=(--preset flux-dev --height 1024 --width 1024 --device cuda --warmup 2 --iters "$FORWARD_ITERS")
    EDIT_ARGS=(--preset flux-dev --height 1024 --width 1024 --device cuda --rounds "$EDIT_ROUNDS")
    FLUX2_FORWARD_ARGS=(--preset "$FLUX2_PRESET" --height 1024 --width 1024 --txt-len 512 --device cuda --dtype bf16
        --warmup 2 --iters "$FORWARD_ITERS")
    FLUX2_EDIT_ARGS=(--preset "$FLUX2_PRESET" --height 1024 --width 1024 --txt-len 512 --device cuda --rounds "$EDIT_ROUNDS")
fi
[[ -n ${CKPT_TMP:-} ]] && RUNTIME_ARGS+=(--tmp "$CKPT_TMP")
[[ -n ${CKPT_DIR:-} ]] && RUNTIME_ARGS+=(--checkpoint-dir "$CKPT_DIR")

SUMMARY=()
FAILED=0
T_ALL=$(date +%s)

stage() {  # stage NAME COMMAND...: run, tee its output to OUT/NAME.log, record status and seconds
    local name=$1
    shift
    if [[ ",$SKIP," == *",$name,"* ]]; then
        echo "== $name: skipped (SKIP)"
        SUMMARY+=("\"$name\": {\"status\": \"skipped\"}")
        return 0
    fi
    echo "== $name: $*"
    local t0 rc
    t0=$(date +%s)
    set +e
    "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    local dt=$(($(date +%s) - t0))
    echo "== $name: exit $rc after ${dt} s"
    SUMMARY+=("\"$name\": {\"exit\": $rc, \"seconds\": $dt}")
    if [[ $rc -ne 0 ]]; then FAILED=1; fi
}

stage runtime_modes "$PY" benchmarks/runtime_modes.py "${RUNTIME_ARGS[@]}" --modes "$MODES" --out "$OUT/runtime_modes.json"
stage forward "$PY" benchmarks/forward.py "${FORWARD_ARGS[@]}" --compile-scope "$FORWARD_SCOPE" --models ours,diffusers --out "$OUT/forward.json"
stage edit_cost "$PY" benchmarks/edit_cost.py "${EDIT_ARGS[@]}" --compile --out "$OUT/edit_cost.json"
stage flux2_forward "$PY" benchmarks/flux2_forward.py "${FLUX2_FORWARD_ARGS[@]}" --out "$OUT/flux2_forward.json"
stage flux2_edit_cost "$PY" benchmarks/edit_cost.py "${FLUX2_EDIT_ARGS[@]}" --compile --out "$OUT/flux2_edit_cost.json"

TOTAL=$(($(date +%s) - T_ALL))
{
    echo "{"
    echo "  \"tiny\": $([[ $TINY == 1 ]] && echo true || echo false),"
    echo "  \"total_seconds\": $TOTAL,"
    echo "  \"settings\": {\"steps\": $STEPS, \"modes\": \"$MODES\", \"forward_scope\": \"$FORWARD_SCOPE\", \"forward_iters\": $FORWARD_ITERS, \"edit_rounds\": $EDIT_ROUNDS},"
    echo "  \"stages\": {"
    for i in "${!SUMMARY[@]}"; do
        sep=$([[ $i -lt $((${#SUMMARY[@]} - 1)) ]] && echo "," || echo "")
        echo "    ${SUMMARY[$i]}$sep"
    done
    echo "  }"
    echo "}"
} >"$OUT/gpu_check.json.tmp"
mv "$OUT/gpu_check.json.tmp" "$OUT/gpu_check.json"
echo "gpu_check: total ${TOTAL} s; JSON in $OUT: $(cd "$OUT" && ls -- *.json | tr '\n' ' ')"
exit $FAILED
