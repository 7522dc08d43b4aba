#!/usr/bin/env bash
# The CUDA checks and GPU figures of docs/benchmarks.md ("On a GPU"), in one run on a lent GPU machine.
#
#   OUT=/tmp/gpu bash benchmarks/gpu.sh            # from the repository root, with torch (CUDA build) importable
#   DEVICE=cpu STOP_AFTER=merge-qoft bash benchmarks/gpu.sh   # the command checks only, on a CPU machine
#
# Checks that the CUDA code paths run end to end (decompose -> train PSOFT / OFT / QOFT over NF4 in bf16 on the
# GPU -> merge, verified), then takes the GPU figures: the training step against PEFT (benchmarks/train_step.py),
# the decomposition on the 1B shape's weights on the GPU and, for the CPU bars, on 2 threads of that quiet machine
# (benchmarks/decompose.py), and QOFT against QLoRA (benchmarks/quantized.py). Everything goes to $OUT/gpu.log;
# each step has its own time limit so one slow step leaves the others' results.
#
# The machine used for docs/benchmarks.md had no package index: transformers 4.57 (the project's pin), tokenizers,
# huggingface_hub, peft, gguf and bitsandbytes travelled as wheels; PSOFT_GPU_SITE names extra import paths.
set -u
OUT=${OUT:-/tmp/psoft-gpu}
WORK=${WORK:-/tmp/psoft-gpu-work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="${PSOFT_GPU_SITE:+$PSOFT_GPU_SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu.log"
PY=${PYTHON:-python3}
CLI="$PY -m psoft_export"
M=fixtures/models/llama
DATA=fixtures/data/train.jsonl
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu runs the command checks here (the benchmarks are for the GPU)

step() {  # step NAME SECONDS COMMAND...: run with a limit, log all of it, print the tail
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== $name: $*" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name rc=$rc $(($(date +%s) - start))s" | tee -a "$LOG"
    if [ "$name" = "${STOP_AFTER:-}" ]; then exit 0; fi
}

step env 60 $PY -c "
import torch, transformers, peft
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
print('transformers', transformers.__version__, 'peft', peft.__version__)
import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)
"
nvidia-smi -L >>"$LOG" 2>&1

# CUDA paths of the commands, on the Llama fixture (functional, not timed).
step decompose 120 $CLI decompose $M -o "$WORK/dec" --rank 16 --overwrite
for method in psoft oft; do
    extra=""
    [ $method = psoft ] && extra="--decomposition $WORK/dec"
    step "train-$method" 180 $CLI train $M --data $DATA $extra --method $method --device $DEVICE --precision bf16 \
        --steps 40 --seq-len 64 --lr 2e-2 -o "$WORK/$method" --overwrite --json
    step "merge-$method" 180 $CLI merge $M --adapter "$WORK/$method" --to safetensors -o "$WORK/$method-merged" \
        --overwrite --json
done
step train-qoft 180 $CLI train $M --data $DATA --method oft --quantize nf4 --device $DEVICE --precision bf16 \
    --steps 40 --seq-len 64 --lr 2e-2 -o "$WORK/qoft" --overwrite --json
step merge-qoft 180 $CLI merge $M --adapter "$WORK/qoft" --to safetensors -o "$WORK/qoft-merged" --overwrite --json

# The training step against PEFT, bf16 autocast, a Llama-shaped stack.
step train-step 240 $PY benchmarks/train_step.py --device cuda --dtype bf16 --hidden 2048 --intermediate 8192 \
    --layers 4 --heads 16 --vocab 32000 --batch 8 --seq 512 --repeats 10 --no-memory

# The decomposition of the 1B shape's weights: on the GPU, and on 2 CPU threads of this quiet machine.
DEC1B="--rank 32 --layers 1 --hidden 2048 --intermediate 8192 --heads 32 --kv-heads 8 --work $WORK/dec1b"
step decompose-cpu 300 $PY benchmarks/decompose.py $DEC1B --threads 2 --variants ours-exact,ours-lowrank,ours-full
step decompose-cuda 180 $PY benchmarks/decompose.py $DEC1B --device cuda --variants ours-exact,ours-lowrank,ours-full

[ -f benchmarks/quantized.py ] && step quantized 240 $PY benchmarks/quantized.py --device cuda
echo "=== done" | tee -a "$LOG"
