#!/usr/bin/env bash
# The GPU checks in one prepared script (~8 min on one H200), no Ray (the GPU host cannot carry it):
#   bench/gpu_check.sh OUTDIR            on a CUDA host: every key=value line also goes to OUTDIR/gpu_check.txt
#   bench/gpu_check.sh OUTDIR --cpu      dry run of the same steps on the CPU, tiny sizes (checks the script)
# Steps: the training step (bf16, +/- torch.compile, +/- channels_last, batch 64 and 256, the port's
# step as the baseline), fp16 with the grad scaler, the DDP path under torchrun (NCCL initialises,
# steps run), the Serve replica's forward at batch 1 and 8, GPU JPEG decode.
set -uo pipefail
OUT="${1:?usage: bench/gpu_check.sh OUTDIR [--cpu]}"
MODE="${2:-}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
F="$OUT/gpu_check.txt"
: > "$F"
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
if [ "$MODE" = "--cpu" ]; then
  DEV=cpu; TO=900; B1=4; B2=8; IT=1; SMALL="--config tune_configs/smoke.yaml"; NPROC=1; DDPX="--small --batch 4 --steps 2"
else
  DEV=cuda; TO=240; B1=64; B2=256; IT=10; SMALL=""; NPROC=1; DDPX="--steps 5"
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu=/' | tee -a "$F"
fi
step() { echo "# $*" | tee -a "$F"; timeout $TO "$@" --out "$F" || echo "failed=$*" | tee -a "$F"; }
# The training step: bf16 eager (and the port's fp32 step in the same run), compile, channels_last, batch 256.
step "$PY" bench/train_step.py --device $DEV --precision bf16 --batch $B1 --iters $IT $SMALL --prefix b${B1}_bf16_
step "$PY" bench/train_step.py --device $DEV --precision bf16 --batch $B1 --iters $IT $SMALL --channels-last --no-naive --prefix b${B1}_bf16_cl_
step "$PY" bench/train_step.py --device $DEV --precision bf16 --batch $B1 --iters $IT $SMALL --compile --no-naive --prefix b${B1}_bf16_compile_
step "$PY" bench/train_step.py --device $DEV --precision bf16 --batch $B1 --iters $IT $SMALL --compile --channels-last --no-naive --prefix b${B1}_bf16_compile_cl_
step "$PY" bench/train_step.py --device $DEV --precision bf16 --batch $B2 --iters $IT $SMALL --no-naive --prefix b${B2}_bf16_
step "$PY" bench/train_step.py --device $DEV --precision bf16 --batch $B2 --iters $IT $SMALL --compile --no-naive --prefix b${B2}_bf16_compile_
if [ "$DEV" = cuda ]; then
  step "$PY" bench/train_step.py --device cuda --precision fp16 --batch $B1 --iters $IT --no-naive --prefix b${B1}_fp16_
fi
# DDP through torch.distributed as Ray Train sets it up (NCCL on GPU).
echo "# torchrun ddp_step" | tee -a "$F"
timeout 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node $NPROC bench/ddp_step.py --device $DEV --precision bf16 $DDPX --out "$F" \
  || echo "failed=ddp_step" | tee -a "$F"
# The Serve replica's work per request batch, and GPU JPEG decode.
step "$PY" bench/replica_forward.py --device $DEV --iters $((IT + 2)) $SMALL
step "$PY" bench/gpu_decode.py --device $DEV --n $((B1 * 4)) --batch $B1
echo "wrote $F"
