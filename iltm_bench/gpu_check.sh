#!/usr/bin/env bash
# GPU checks and timings in one go, for a machine with a CUDA device (run from the repository root):
#
#     bash iltm_bench/gpu_check.sh OUT_DIR [SECONDS]
#
# 1. the CUDA tests (Testing/core/test_cuda.py, test_kde.py): detection on the GPU agrees with the CPU;
# 2. preset_cost.py: the tiny and small presets on the CPU and the GPU side by side (3D, the sweep's size); on the
#    GPU, the paper preset at 128^3 (3D) and the small and paper presets at 256^2 (2D), in float32 and under
#    bfloat16 autocast (what mixed precision would gain); each with what one ILTM run would cost;
# 3. the whole test suite with the GPU visible (training and detection default to device auto, so they run on it),
#    in the time that is left of SECONDS (default 600). The Slicer module's tests need slicer-core and are left out.
#
# Every step writes its log into OUT_DIR; a step that fails or runs out of time does not stop the next one.
set -u -o pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [SECONDS]}
budget=${2:-600}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
end=$((SECONDS + budget))

step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.txt, report its status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

step env 60 bash -c "nvidia-smi -L; $py -c 'import torch, monai, SimpleITK; print(\"torch\", torch.__version__, \
\"monai\", monai.__version__, \"SimpleITK\", SimpleITK.Version_VersionString(), \"cuda\", torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")'"
step cuda_tests 240 "$py" -m pytest -q -p no:cacheprovider Testing/core/test_cuda.py Testing/core/test_kde.py
step cost_3d 150 "$py" -m iltm_bench.preset_cost --dims 3 --presets tiny small --devices cpu cuda
# small has two downsamplings, so 32768 tokens at 128^3: its detection alone outran 150 s on an H200.
step cost_3d_128 240 "$py" -m iltm_bench.preset_cost --dims 3 --size 128 128 128 --n-train 300 \
    --presets paper --devices cuda cuda-bf16 --steps 1
step cost_2d_256 90 "$py" -m iltm_bench.preset_cost --dims 2 --size 256 256 --n-train 300 \
    --presets small paper --devices cuda cuda-bf16 --steps 3
left=$((end - SECONDS))
if [ "$left" -gt 30 ]; then
    step suite "$left" "$py" -m pytest -q -p no:cacheprovider -n 12 --ignore=Testing/slicer_extension
else
    echo "== suite: skipped, ${left} s left"
fi
