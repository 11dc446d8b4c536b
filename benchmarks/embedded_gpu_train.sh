#!/usr/bin/env bash
# Train embedded-model candidates side by side on one NVIDIA GPU (issue: the embedded model, second
# generation), then pack each trained folder for the trip back. Run from the repository root on a GPU
# machine that has torch, transformers and numpy; diffusers, importlib_metadata and a copy of CLIP's
# bpe_simple_vocab_16e6.txt.gz (for machines without open_clip) are taken from .whl/ when present.
#
#   OUT=/tmp/gpu-out bash benchmarks/embedded_gpu_train.sh [UNET_MINUTES]
#
# A one-minute smoke run (--quick) goes first, beside the real runs: if it fails, everything stops at
# once, so a broken GPU path costs a minute, not the whole budget. Each candidate writes
# $OUT/<name>.tgz.partNN (split to 15 MiB) and the log of all of them goes to $OUT/log.txt.
# The candidates' folders hold training.json with the steps each reached: rerun with --steps N (same
# seed and arguments) to reproduce one on a CPU (bit-identical there; GPU float results differ).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
MIN=${1:-5}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu EXTRA="--pool 500 ..." tries the script itself on a CPU
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
LOG=$OUT/log.txt
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
mkdir -p /tmp/pp && ln -sfn "$PWD/plugins" /tmp/pp/aipaint_plugins
export PYTHONPATH=/tmp/pp:$PWD:/tmp/site PYTHONUNBUFFERED=1
[ -f .whl/bpe_simple_vocab_16e6.txt.gz ] && export AIPAINT_CLIP_BPE=$PWD/.whl/bpe_simple_vocab_16e6.txt.gz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"

COMMON="--device $DEVICE --seed 11 --pool 30000 --vae-pool-extra 3000 --vae-steps 4000 --vae-minutes 1.5 \
--batch 256 --schedule moderate --phrasings 0.6 --emphasis 0.3 --drop-text 0.15 --threads 2 --checkpoint-minutes 100"
declare -A RUNS=(
    [ch8-probe03]="--latent-channels 8 --vae-rgb-probe 0.3"
    [ch8-probe01]="--latent-channels 8 --vae-rgb-probe 0.1"
    [ch4-noprobe]="--latent-channels 4"
)
pids=()
for name in "${!RUNS[@]}"; do
    # shellcheck disable=SC2086
    python3 -m aipaint_plugins.shapes_world.train $COMMON ${RUNS[$name]} --minutes "$MIN" $EXTRA --out "/tmp/runs/$name" \
        2>&1 | grep --line-buffered -v "Writing model shards" | sed -u "s/^/[$name] /" >>"$LOG" &
    pids+=($!)
done
start=$(date +%s)
if ! python3 -m aipaint_plugins.shapes_world.train --quick --device "$DEVICE" --latent-channels 8 --vae-rgb-probe 0.3 \
        --phrasings 0.6 --emphasis 0.3 --schedule moderate --out /tmp/runs/smoke 2>&1 | sed -u "s/^/[smoke] /" >>"$LOG"; then
    echo "smoke run failed after $(( $(date +%s) - start )) s: stopping" | tee -a "$LOG"
    pkill -f aipaint_plugins.shapes_world.train
    tail -40 "$LOG"
    exit 3
fi
echo "smoke run passed in $(( $(date +%s) - start )) s" | tee -a "$LOG"
wait "${pids[@]}"
for name in "${!RUNS[@]}"; do
    if [ -f "/tmp/runs/$name/training.json" ]; then
        tar -C /tmp/runs --exclude="$name/tokenizer" -czf "/tmp/$name.tgz" "$name" &&
            split -b 15M -d "/tmp/$name.tgz" "$OUT/$name.tgz.part"
    else
        echo "$name: no model" | tee -a "$LOG"
    fi
done
grep -E "VAE done|done:|Error|error" "$LOG" | tail -20
ls -la "$OUT"
