#!/usr/bin/env bash
# One-call GPU runbook: everything the project measures or checks only on a CUDA GPU, in one run of at most
# ~10 minutes, every table into one folder.
#
#   bash benchmarks/gpu_check.sh                # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run      # print the plan (steps, time limits, commands) and exit
#   bash benchmarks/gpu_check.sh --fill-wheels  # on a machine WITH internet: fill .whl/ (see below), then exit
#
# Steps (each time-boxed with `timeout`; a failing or timed-out step is recorded and the next one runs):
#   0. install the packages the GPU machine lacks from the wheels carried in .whl/ (into /tmp/site, PYTHONPATH),
#      and record the machine (nvidia-smi, versions, which imports work)
#   1. python -m pytest tests/kernels -m gpu                       -> kernels_gpu.txt
#   2. benchmarks/bucket_compile.py: the demo's bucketed U-Net with train.compile on, 3 bucket shapes x 2 rounds per
#      train.compile_shapes policy (eager, dynamic, torch's default, static): compiles and step time
#                                                                  -> bucket_compile.md
#   3. python benchmarks/attention.py                              -> attention.md
#   4. python benchmarks/groupnorm_silu.py                         -> groupnorm_silu.md
#   5. benchmarks/train_throughput.py, 64 px base U-Net (configs/unet/base64.yaml, ~440 M parameters),
#      synthetic data (precomputed T5-XXL-shaped tokens), bf16, ZeRO-2, the config's fast path (triton attention,
#      train.compile auto = on: the first warm-up step compiles)  -> train_base64.md
#   6. benchmarks/train_throughput.py, 256 px latent U-Net of SD2's size (configs/unet/latent256_sd2.yaml,
#      ~877 M parameters) on precomputed-style random latents, with a random-weight KL-f8 autoencoder folder
#      built from configs/autoencoder/kl_f8.yaml (only loaded, never run in the step); eager
#      (GPU_CHECK_LATENT_COMPILE=auto compiles it too, if the budget allows)  -> train_latent256.md
#   7. benchmarks/peers.py: the same latent U-Net's Trainer step (ZeRO-0 and ZeRO-2) next to the plain diffusers
#      training loop, bf16  -> peers_latent256.md
#   summary.md: the machine, one status line per step and every table above, in that order.
#
# Time: the first H200 run (2026-12-04) found every step far slower than these limits once assumed (the Triton and
# Inductor compiles dominate: a tiny bucketed U-Net took 146 s to compile, the 440 M U-Net more than 150 s), so a
# whole pass needs ~30 min, more than one 10-minute device call: run it in parts, e.g.
#   GPU_CHECK_ONLY=train_base64 bash benchmarks/gpu_check.sh
#   GPU_CHECK_ONLY=kernels_gpu,attention,groupnorm_silu bash benchmarks/gpu_check.sh
# Output folder: $OUT when set (the device runner's folder), else benchmarks/out/. Logs of every step: logs/.
# Environment knobs: GPU_CHECK_ONLY (comma-separated step names; default all), PYTHON (default python3, or
# .venv/bin/python when python3 has no torch), GPU_CHECK_BUDGET_S
# (default 580: the whole run; a step gets at most what is left), GPU_CHECK_LATENT_COMPILE (off), WHEEL_DIR (.whl),
# SITE_DIR (/tmp/site).
#
# Carrying wheels: the GPU machine has no network and lacks deepspeed, diffusers, webdataset, open_clip_torch,
# ftfy, braceexpand, torch-fidelity (and may lack some of their small dependencies). Fill the git-ignored folder .whl/ on a
# machine with internet (`bash benchmarks/gpu_check.sh --fill-wheels` runs exactly this):
#   pip download --no-deps -d .whl --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
#       --only-binary=:all: webdataset==1.0.2 braceexpand open_clip_torch==3.3.0 timm==1.0.31 ftfy wcwidth \
#       diffusers==0.42.1 hjson py-cpuinfo einops msgpack pydantic==2.14.3 pydantic-core==2.50.4 annotated-types \
#       typing-inspection torch-fidelity==0.4.0
#   DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8   # a py3-none-any wheel
# (--python-version/--platform pick wheels for the GPU machine's Python 3.12; the binary ones are msgpack and
# pydantic-core; pip wheel for deepspeed needs torch importable where it runs.) Then hand .whl/ to the run, e.g.
# with the device runner: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"]).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE_DIR=${SITE_DIR:-/tmp/site}
BUDGET_S=${GPU_CHECK_BUDGET_S:-580}
LATENT_COMPILE=${GPU_CHECK_LATENT_COMPILE:-off}
ONLY=${GPU_CHECK_ONLY:-}
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --fill-wheels) MODE=fill ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --fill-wheels]" >&2; exit 2 ;;
esac

PURE_WHEELS="webdataset==1.0.2 braceexpand open_clip_torch==3.3.0 timm==1.0.31 ftfy wcwidth diffusers==0.42.1 \
hjson py-cpuinfo einops annotated-types typing-inspection torch-fidelity==0.4.0"
BINARY_WHEELS="msgpack pydantic==2.14.3 pydantic-core==2.50.4"

if [ "$MODE" = fill ]; then
  mkdir -p "$WHEEL_DIR"
  if git rev-parse --git-dir >/dev/null 2>&1 && ! git check-ignore -q "$WHEEL_DIR/x.whl"; then
    echo "warning: $WHEEL_DIR/ is not ignored by git; add it to .gitignore or .git/info/exclude" >&2
  fi
  # shellcheck disable=SC2086  # word splitting of the package lists is intended
  pip download --no-deps -d "$WHEEL_DIR" --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --only-binary=:all: $PURE_WHEELS $BINARY_WHEELS || exit 1
  DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w "$WHEEL_DIR" deepspeed==0.19.8 || exit 1
  ls -l "$WHEEL_DIR"
  exit 0
fi

OUT_DIR=${OUT:-benchmarks/out}
[ "$MODE" = dry ] || mkdir -p "$OUT_DIR/logs"
OUT_DIR=$(cd "$OUT_DIR" 2>/dev/null && pwd || echo "$PWD/$OUT_DIR")
SUMMARY="$OUT_DIR/summary.md"
STATUS="$OUT_DIR/logs/status.md"
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1 && [ -x .venv/bin/python ]; then
  PYTHON=.venv/bin/python
fi

# name | time limit (s) | stdout file | command (no quoted arguments: it is split on spaces)
step_plan=(
  "kernels_gpu|240|kernels_gpu.txt|$PYTHON -m pytest tests/kernels -m gpu -q -p no:cacheprovider"
  "bucket_compile|420|bucket_compile.log|$PYTHON benchmarks/bucket_compile.py --shapes 3 --rounds 2 \
--policies eager dynamic default --out $OUT_DIR/bucket_compile.md"
  "attention|90|attention.md|$PYTHON benchmarks/attention.py"
  "groupnorm_silu|60|groupnorm_silu.md|$PYTHON benchmarks/groupnorm_silu.py"
  "train_base64|420|train_base64.log|$PYTHON benchmarks/train_throughput.py --config configs/unet/base64.yaml \
--set model.text_source=precomputed train.precision=bf16 --steps 10 --warmup 3 --out $OUT_DIR/train_base64.md"
  "train_latent256|300|train_latent256.log|$PYTHON benchmarks/train_throughput.py \
--config configs/unet/latent256_sd2.yaml --random-autoencoder configs/autoencoder/kl_f8.yaml \
--set model.text_source=precomputed model.latent_source=precomputed train.precision=bf16 train.compile=$LATENT_COMPILE \
--steps 10 --warmup 3 --out $OUT_DIR/train_latent256.md"
  "peers_latent256|300|peers_latent256.log|$PYTHON benchmarks/peers.py --only train \
--train-config configs/unet/latent256_sd2.yaml --random-autoencoder configs/autoencoder/kl_f8.yaml \
--set model.text_source=precomputed model.latent_source=precomputed train.precision=bf16 --batch 8 --steps 5 \
--rounds 3 --out $OUT_DIR/peers_latent256.md"
)

if [ -n "$ONLY" ]; then
  chosen=()
  for entry in "${step_plan[@]}"; do
    case ",$ONLY," in *",${entry%%|*},"*) chosen+=("$entry") ;; esac
  done
  if [ "${#chosen[@]}" -eq 0 ]; then
    echo "GPU_CHECK_ONLY=$ONLY names no step; steps: $(printf '%s ' "${step_plan[@]%%|*}")" >&2
    exit 2
  fi
  step_plan=("${chosen[@]}")
fi

if [ "$MODE" = dry ]; then
  echo "gpu_check plan (budget ${BUDGET_S} s, output $OUT_DIR, python $PYTHON):"
  echo "  setup: pip install -q --no-index --no-deps --upgrade --target $SITE_DIR $WHEEL_DIR/*.whl;" \
       "export PYTHONPATH=$SITE_DIR:$PWD"
  for entry in "${step_plan[@]}"; do
    IFS='|' read -r name limit out command <<< "$entry"
    echo "  $name (<= ${limit} s) -> $out: $command"
  done
  exit 0
fi

: > "$STATUS"

record() {  # name status seconds output
  printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >> "$STATUS"
  echo "gpu_check: $1: $2 (${3} s)" >&2
}

run_step() {  # name limit_s output_file command...
  local name=$1 limit=$2 out=$3
  shift 3
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    record "$name" "skipped: the ${BUDGET_S} s budget is spent" 0 "-"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local began=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT_DIR/$out" 2> "$OUT_DIR/logs/$name.stderr"
  local rc=$? took=$(($(date +%s) - began))
  if [ "$rc" -eq 0 ]; then
    record "$name" ok "$took" "$out"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" "TIMEOUT after ${limit} s" "$took" "$out, logs/$name.stderr"
  else
    record "$name" "FAILED (exit $rc): $(tail -n 1 "$OUT_DIR/logs/$name.stderr" | tr '|' '/' | cut -c1-160)" \
      "$took" "$out, logs/$name.stderr"
  fi
}

# ---- 0. set-up: wheels, environment record --------------------------------------------------------------------
if git rev-parse --git-dir >/dev/null 2>&1 && ! git check-ignore -q "$WHEEL_DIR/x.whl"; then
  echo "gpu_check: warning: $WHEEL_DIR/ is not ignored by git" >&2
fi
began=$(date +%s)
if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
  if timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target "$SITE_DIR" "$WHEEL_DIR"/*.whl \
      > "$OUT_DIR/logs/wheels.log" 2>&1; then
    record wheels "ok: $(ls "$WHEEL_DIR"/*.whl | wc -l) wheels into $SITE_DIR" $(($(date +%s) - began)) logs/wheels.log
  else
    record wheels "FAILED: $(tail -n 1 "$OUT_DIR/logs/wheels.log" | tr '|' '/' | cut -c1-160)" \
      $(($(date +%s) - began)) logs/wheels.log
  fi
  export PYTHONPATH="$SITE_DIR:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  record wheels "none in $WHEEL_DIR/ (fill it with --fill-wheels on a machine with internet)" 0 "-"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  "$PYTHON" - <<'EOF' 2>&1
import importlib, platform
print("python", platform.python_version())
for name in ("pipeline", "torch", "triton", "deepspeed", "diffusers", "transformers", "webdataset", "open_clip", "timm",
             "huggingface_hub", "pydantic", "xformers"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as exc:  # noqa: BLE001 - report every import problem, keep going
        print(f"{name}: NOT IMPORTABLE ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no device")
EOF
} > "$OUT_DIR/environment.txt"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  record cuda "no CUDA device: nothing measured (CPU runs: see benchmarks/RESULTS.md)" 0 environment.txt
  step_plan=()
fi

# ---- 1-7 --------------------------------------------------------------------------------------------------------
for entry in "${step_plan[@]}"; do
  IFS='|' read -r name limit out command <<< "$entry"
  # shellcheck disable=SC2086  # the command string is split into words on purpose (no quoted arguments in it)
  run_step "$name" "$limit" "$out" $command
done

# ---- summary ------------------------------------------------------------------------------------------------------
{
  echo "# gpu_check $(date -u '+%Y-%m-%d'), $(($(date +%s) - START)) s"
  echo
  echo '```'
  cat "$OUT_DIR/environment.txt"
  echo '```'
  echo
  echo "| step | status | seconds | output |"
  echo "|---|---|---|---|"
  cat "$STATUS"
  for table in bucket_compile.md attention.md groupnorm_silu.md train_base64.md train_latent256.md peers_latent256.md; do
    if [ -s "$OUT_DIR/$table" ]; then
      echo
      cat "$OUT_DIR/$table"
    fi
  done
  if [ -s "$OUT_DIR/kernels_gpu.txt" ]; then
    echo
    echo "pytest tests/kernels -m gpu (last lines):"
    echo '```'
    tail -n 15 "$OUT_DIR/kernels_gpu.txt"
    echo '```'
  fi
} > "$SUMMARY"
cat "$SUMMARY"
exit 0
