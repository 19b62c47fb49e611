#!/usr/bin/env bash
# Issue 8's accelerator figures in one command, for a session that has a GPU (or TPU):
#
#   bash benchmarks/accelerator.sh [OUTDIR [STEP...]]   # logs to OUTDIR (benchmarks/out)
#
# STEPs (default: all, in this order): device train_b64 train_b512 train_cifar_shape
# sampling_svdm_oe sampling_tvdm_te precision.
# In order of priority, so a time limit cuts the least important part:
#   1. the device and the software (nvidia-smi, jax/flax/optax/orbax versions);
#   2. SVDM+OE train step, float32 and bfloat16, batch 64 at 28x28x1 (the issue's
#      setting) and batch 512 (enough work to fill a large GPU), each row against the
#      matmul peak of its own dtype measured in the same process (train_step.py);
#   3. the CIFAR-shaped row: SVDM+OE at 32x32x3, batch 128, both dtypes;
#   4. 1000-step ancestral sampling of 64 images, SVDM+OE and TVDM+TE, compiled loop vs
#      one dispatch per step (sampling.py);
#   5. the effect of bfloat16 on the loss and gradient on this backend (precision.py).
# Every step runs even if an earlier one failed; each writes OUTDIR/<name>.log.
set -u
out=${1:-benchmarks/out}
shift || true
steps=${*:-device train_b64 train_b512 train_cifar_shape sampling_svdm_oe sampling_tvdm_te precision}
mkdir -p "$out" && out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."

step() {  # step NAME COMMAND...: run, tee the log, report the exit status and seconds
  local name=$1; shift
  case " $steps " in *" $name "*) ;; *) return 0 ;; esac
  echo; echo "### $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log"
  echo "### $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

step device bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv 2>/dev/null; $py -c 'import jax, flax, optax, orbax.checkpoint as o; \
print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__, \
\"orbax\", o.__version__, jax.devices())'"
step train_b64 $py -m benchmarks.train_step --sweep accelerator --batch 64 --image 28 --repeats 30
step train_b512 $py -m benchmarks.train_step --sweep accelerator --batch 512 --image 28 --repeats 30
step train_cifar_shape $py -m benchmarks.train_step --sweep accelerator --batch 128 --image 32 \
  --channels 3 --repeats 30
step sampling_svdm_oe $py -m benchmarks.sampling --vdm svdm --encoder oe --num 64 --steps 1000 \
  --ref-steps 100
step sampling_tvdm_te $py -m benchmarks.sampling --vdm tvdm --encoder te --num 64 --steps 1000 \
  --ref-steps 100
step precision $py -m benchmarks.precision --vdm svdm --encoder oe --batch 64
