#!/usr/bin/env bash
# The prepared GPU benchmark run: benchmarks 1 (train step), 2 (alignment module) and 4 (build)
# at the real sizes on one GPU (written for an H200), inside about 8 minutes.
#
#   bash bench/gpu.sh                 # on the GPU machine, from anywhere in the repository
#   bash bench/gpu.sh --dry-run       # the same scripts at tiny sizes on the CPU (checks the script)
#   bash bench/gpu.sh --log FILE      # also write everything printed to FILE
#                                     # (default $OUT/bench-gpu.log when $OUT is set, else /tmp/...)
#
# Installs nothing and reaches no network: models are random-initialised at the real sizes
# (SD-VAE built from its config, timm encoders with pretrained=False). Needs python with torch,
# numpy and pillow; benches 1 and 4 also need timm, diffusers, zarr and webdataset (the
# project's dependencies). A bench whose modules are missing is reported and skipped. Where the
# GPU machine lacks them, build/gpu-deps.tgz (made by bench/pack_gpu_deps.sh, carried to the
# device) supplies the missing ones.
# Environment: PYTHON (interpreter; default .venv/bin/python, else python3),
# GPU_BENCH_BATCH (train-step batch, default 64), GPU_BENCH_IMAGES (build images N, default 1024).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
LOG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --log) shift; LOG="$1" ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $1 (use --dry-run, --log FILE)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$LOG" ]; then
  LOG="${OUT:-/tmp}/bench-gpu$( [ $DRY = 1 ] && echo -dryrun ).log"
fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEPS_NOTE=""
# Fallback dependencies (bench/pack_gpu_deps.sh): link in only the modules this python lacks.
if [ -f build/gpu-deps.tgz ]; then
  DEPS=/tmp/irepa-gpu-deps; LINKS=/tmp/irepa-gpu-deps-path
  rm -rf "$DEPS" "$LINKS"; mkdir -p "$DEPS" "$LINKS"
  tar -xzf build/gpu-deps.tgz -C "$DEPS"
  for entry in "$DEPS"/*; do
    base=$(basename "$entry"); mod=${base%.py}
    case "$base" in *.libs) ln -s "$entry" "$LINKS/$base"; continue ;; esac
    "$PY" -c "import $mod" > /dev/null 2>&1 || ln -s "$entry" "$LINKS/$base"
  done
  export PYTHONPATH="$PWD:$LINKS${PYTHONPATH:+:$PYTHONPATH}"
  DEPS_NOTE="# build/gpu-deps.tgz: linked in $(ls "$LINKS" | grep -v '\.libs$' | tr '\n' ' ')"
fi
BATCH="${GPU_BENCH_BATCH:-64}"
IMAGES="${GPU_BENCH_IMAGES:-1024}"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # never try the hub

: > "$LOG"
log() { echo "$@" | tee -a "$LOG"; }
START=$(date +%s)
FAILED=()

log "# irepa GPU benchmarks ($( [ $DRY = 1 ] && echo 'DRY RUN: tiny sizes on CPU' || echo 'real sizes' ))"
[ -n "$DEPS_NOTE" ] && log "$DEPS_NOTE"
log "# $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python: $PY"
if [ $DRY = 0 ] && command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/# gpu: /' | tee -a "$LOG"
fi
"$PY" - <<'PY' 2>&1 | tee -a "$LOG"
import importlib, torch
print(f"# torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
for m in ("numpy", "PIL", "timm", "diffusers", "zarr", "webdataset"):
    try:
        mod = importlib.import_module(m)
        print(f"# {m} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"# {m} MISSING ({type(e).__name__})")
PY

have() { "$PY" -c "import $1" > /dev/null 2>&1; }

if [ $DRY = 1 ]; then
  COMMON=(--device cpu --smoke)
  STEP=(); ALIGN=(); BUILD=()
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "bench/gpu.sh: no CUDA device visible; use --dry-run on a CPU machine"; exit 1
  fi
  COMMON=(--device cuda)
  ALIGN=(--real --repeats 10 --warmup 3)
  STEP=(--real --batch "$BATCH" --repeats 10 --warmup 3)
  BUILD=(--real --images "$IMAGES" --workers 4,8,16 --repeats 5 --warmup 2 --profile)
fi

run() {  # run NAME LIMIT_S MODULES -- ARGS...
  local name=$1 limit=$2 mods=$3; shift 4
  for m in ${mods//,/ }; do
    if ! have "$m"; then log ""; log "## bench.$name: SKIPPED (python module $m missing)"; FAILED+=("$name"); return; fi
  done
  log ""; log "## bench.$name"; log '```'; log "\$ python -m bench.$name $*"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" -m "bench.$name" "$@" 2>&1 | grep -v -e 'accelerate' -e '^```$' -e '^pip install accelerate' -e '^\.$' | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log '```'
  log "(bench.$name: $(( $(date +%s) - t0 )) s, exit $rc$( [ "$rc" = 124 ] && echo ': TIMED OUT' ))"
  [ "$rc" = 0 ] || FAILED+=("$name")
}

# Order: cheapest first, so a slow start still leaves results. Limits sum to < 8 min.
run align      60  torch                                    -- "${COMMON[@]}" "${ALIGN[@]}"
run train_step 210 torch,timm,diffusers,zarr               -- "${COMMON[@]}" "${STEP[@]}"
run build      180 torch,timm,diffusers,zarr,webdataset,PIL -- "${COMMON[@]}" "${BUILD[@]}"

log ""
log "all: $(( $(date +%s) - START )) s; failed: ${FAILED[*]:-none}; output in $LOG"
[ ${#FAILED[@]} = 0 ]
