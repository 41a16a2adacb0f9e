#!/usr/bin/env bash
# The GPU check of issue 12, as one prepared script of at most 10 minutes: one GRPO step of hpt
# and of TRL 1.16's GRPOTrainer, both in bf16 (benchmarks/grpo_step.py --bf16), on a GPU, for a
# model with Qwen2.5-0.5B's layers built from a config (random weights, 360M parameters with the
# demo's vocabulary: no checkpoint can be downloaded there), at 16 x 8 x 256 and at the SmolLM2 CPU
# case's 4 x 4 x 128. It prints each side's step time, its stages, peak GPU memory and MFU (the
# FLOP bound of the step at the GPU's data-sheet bf16 peak over the measured step: verl's model
# FLOPs, 2 x params x tokens to generate and 6 x to train).
#
# On a machine with no network (the project's lent GPU machines), the packages the GPU image lacks
# travel as wheels: `make gpu-wheels` here downloads them into .whl/ (about 20 MB, Python 3.12,
# x86-64), and the device call carries .whl:
#
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Results: $OUT/grpo_step_gpu_<case>.json (or benchmarks/results/ without $OUT) and each case's
# table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
LIMIT=${GPU_CHECK_SECONDS:-540}  # what the benchmark may take, inside the 10 minutes
WHEELS=${GPU_CHECK_WHEELS:-.whl}
CASES=${GPU_CHECK_CASES:-tiny-16x8x64,qwen0.5b-shape-4x4x128,qwen0.5b-shape-16x8x256}
# GPU_CHECK_CPU=1 runs it without a GPU (to check the script and the wheels on a CPU machine, with
# GPU_CHECK_CASES=tiny-16x8x64)

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/hpt-site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/hpt-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # hpt itself, from this checkout
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

"$PY" - <<'EOF'
import importlib.metadata as md
import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_CPU") != "1":
    print("gpu_check: no CUDA device visible to torch; this script is for a GPU machine")
    sys.exit(2)
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print("gpu_check:", device, "| python", sys.version.split()[0])


def version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"


names = ("torch", "transformers", "trl", "accelerate", "datasets", "pyarrow", "peft", "pydantic")
print("gpu_check:", ", ".join(f"{n} {version(n)}" for n in names))
try:  # fail here in one line, not in a benchmark child process, if a package is missing
    import hpt.train.recipe  # noqa: F401
    import trl  # noqa: F401
except ImportError as error:
    print(f"gpu_check: {error} (make gpu-wheels, then carry .whl)")
    sys.exit(2)
EOF

mkdir -p "$RESULTS"
deadline=$((SECONDS + LIMIT))
# The GPU-only tests first (the fused decode step replayed from real CUDA graphs against the eager
# step; a one-call shared-prompt pass against the unshared one). A failure is reported and the benchmark still runs: each capture is checked against its
# eager run at run time (a bad one turns graphs off with a warning), and the last case decodes
# eagerly anyway.
tests=passed
if ! "$PY" -c "import pytest" 2> /dev/null; then
    tests="NOT RUN (no pytest: make gpu-wheels, then carry .whl)"
elif ! timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_rollout.py \
    tests/test_packing.py -k cuda; then
    tests=FAILED
fi
echo "gpu_check: CUDA tests $tests"
# One case at a time under one deadline, so that a case that fails or runs long still leaves the
# others' numbers (and its own traceback) behind: the tiny model first (a minute: does each side
# run on this device at all?), then Qwen2.5-0.5B's layers at the SmolLM2 CPU case's 4 x 4 x 128,
# then at 16 questions x 8 rollouts x 256 tokens. 1 repeat, 1 warm-up step and 2 timed steps a side.
# Then (GPU_CHECK_EAGER=0 skips it), the 4 x 4 x 128 case with hpt's fused step run eagerly (the
# step before CUDA graphs).
failed=0
run_case() {  # run_case NAME EXTRA-ARGS...: one grpo_step.py run, within what is left of LIMIT
    local name=$1 left=$((deadline - SECONDS))
    shift
    if ((left < 30)); then
        echo "gpu_check: $name skipped, ${left} s left of ${LIMIT}"
        failed=1
        return
    fi
    echo "gpu_check: $name (at most ${left} s)"
    timeout "$left" "$PY" benchmarks/grpo_step.py --bf16 --repeats 1 --warmup 1 --steps 2 "$@" \
        || { echo "gpu_check: $name failed (exit $?)"; failed=1; }
}
for case in ${CASES//,/ }; do
    run_case "$case" --cases "$case" --output "$RESULTS/grpo_step_gpu_$case.json"
done
if [[ ${GPU_CHECK_EAGER:-1} == 1 ]]; then
    run_case "eager decode qwen0.5b-shape-4x4x128" --no-cuda-graphs \
        --cases qwen0.5b-shape-4x4x128 --output "$RESULTS/grpo_step_gpu_eager.json"
fi
# Then (GPU_CHECK_SHARED=0 skips it) the 16 x 8 x 256 case with hpt's prompts shared
# (optim.share_prompts=true; auto leaves them unshared on a GPU): one decoder call a pass, fewer
# FLOPs, about 40% more operations, which decides whether auto should share on GPUs too.
if [[ ${GPU_CHECK_SHARED:-1} == 1 ]]; then
    run_case "shared prompts qwen0.5b-shape-16x8x256" --share-prompts true \
        --cases qwen0.5b-shape-16x8x256 --output "$RESULTS/grpo_step_gpu_shared.json"
fi
echo "gpu_check: CUDA tests $tests"
[[ $tests == passed ]] || failed=1
exit "$failed"
