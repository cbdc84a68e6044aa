#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA GPU, PyTorch + torchvision installed, and no network:
#
#     DTRAIN_DATA_DIR=/path/to/data bench/gpu_check.sh [RESULT_FILE]
#
# Copy the project over (with the folder holding MNIST/raw/), run this from anywhere. It installs
# nothing: a venv that sees the machine's packages gets this folder on its path and a `dtrain` script.
# Within 6 minutes (a lent machine's minutes are few; each stage has its own time limit, 370 s in all):
# `dtrain doctor --gpus 1`; the system rows, a trace and a memory snapshot of the MNIST recipe;
# bench/time_to_accuracy.py (time to 99%: standard and fast settings, eager and --cuda-graph, the
# reference program); bench/lm.py at its GPU size (a 352M GPT, bf16: the Trainer against a hand-written
# loop, tokens/s and MFU, in a 60 s slice); then the test suite's GPU-marked tests (NCCL, bf16, fp16 with GradScaler,
# activation checkpointing's CUDA memory, --cuda-graph against the eager step). Everything goes to
# RESULT_FILE (default bench/gpu_check.out).
set -uo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-bench/gpu_check.out}")"
data="${DTRAIN_DATA_DIR:-$(cd .. && pwd)/shared/data}"
python="${PYTHON:-python3}"

if [ ! -f "$data/MNIST/raw/train-images-idx3-ubyte" ]; then
    echo "gpu_check: MNIST not found under $data/MNIST/raw; set DTRAIN_DATA_DIR to the folder that holds MNIST/raw/." >&2
    exit 2
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi sees no GPU; run this on a machine with a CUDA GPU." >&2
    exit 2
fi
export DTRAIN_DATA_DIR="$data" PYTHONUNBUFFERED=1 WANDB_MODE=disabled

venv="$(mktemp -d /tmp/dtrain-gpu-check.XXXXXX)"
trap 'rm -rf "$venv"' EXIT
# dtrain itself without pip: a .pth file puts this folder and the machine's packages on the path (a venv
# made from a venv sees only the base interpreter's packages, not the first venv's), a two-line script is `dtrain`.
"$python" -m venv --without-pip "$venv" || { echo "gpu_check: $python -m venv failed (see above)." >&2; exit 2; }
"$python" -c 'import sys; print("\n".join([sys.argv[1]] + [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]))' \
    "$(pwd)" >"$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')/dtrain-src.pth"
printf '#!%s\nfrom dtrain.cli import main\nmain()\n' "$venv/bin/python" >"$venv/bin/dtrain"
chmod +x "$venv/bin/dtrain"

{
    echo "# dtrain GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
    "$venv/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "CUDA", torch.version.cuda)'
    echo
    echo "## dtrain doctor --gpus 1"
    timeout 30 "$venv/bin/dtrain" doctor --gpus 1 2>&1
    echo "doctor exit code: $?"
    echo
    echo "## system rows, a trace and a memory snapshot: 60 steps of the MNIST recipe on 1 GPU, bf16"
    run="$venv/run-system"
    timeout 40 "$venv/bin/dtrain" launch recipes/mnist_cnn.py --gpus 1 --precision bf16 --max-steps 60 --trace 20,2,3 \
        --memory-snapshot --checkpoint-every never --run-dir "$run" --wandb disabled -- --epochs 1 --log-every 20 2>&1 | tail -3
    grep '"kind": "system"' "$run/metrics.jsonl"; grep flops_per_sample "$run/config.yaml"; ls -l "$run/traces"
    echo
    echo "## bench/time_to_accuracy.py"
    timeout 135 "$venv/bin/python" bench/time_to_accuracy.py --budget 120 2>&1
    echo "time_to_accuracy exit code: $?"
    echo
    echo "## bench/lm.py --size gpu"
    timeout 75 "$venv/bin/python" bench/lm.py --size gpu --budget 40 2>&1
    echo "lm exit code: $?"
    echo
    echo "## pytest -m gpu"
    timeout 85 "$venv/bin/python" -m pytest -m gpu tests/test_gpu.py -v -s -p no:cacheprovider 2>&1
    echo "pytest exit code: $?"
} | tee "$out"
echo "gpu_check: results in $out"
