#!/usr/bin/env bash
# Every GPU check and measurement of issue 8 in ONE run on a lent GPU machine (a session has 15
# minutes of device time, the machine's start included: this script stops itself within $BUDGET = 560 s).
#
# Prepare, on the development machine, in the project root:
#   ../shared/tools/device-kit build          # .device/site.tar.xz: ray, zarr, dask, hydra... (not wandb)
#   mkdir -p .device/shared && cp -r ../shared/data .device/shared/   # the tests' real data (4.6 MB)
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .device/whl isal==1.9.1    # not in the kit (0.3 MB): the digests' CRC-32
# Then one device run: carry [".device"], timeout_s 600, command
#   PYTHONUNBUFFERED=1 bash benchmarks/gpu_session.sh
# The steps below take more than one run's budget: ONLY (a regex of step names) picks some, e.g. a first
# run ONLY='gpu_tests|bench_match|bench_match_10' and, with device time left, a second one
# ONLY='bench_extract_.*|bench_decode|bench_store_read|suite' (each run returns its own logs.tgz).
# Logs and JSON rows land in $LOGS, packed after every step into $OUT/logs.tgz (a device run returns at
# most 8 files from $OUT; the archive is one, and is there even if the run is cut short); each step has
# its own time limit, so a
# hang costs that step only. Steps, most important first:
#   1. the GPU tests (pytest -m gpu): engine, extraction (TF32 policy), pinned paths, decoder, Ray actors,
#      the sweep's reduction on cuda (Dask-on-Ray and threaded: block tasks staged in pieces)
#   2. bench_match --device cuda: pinned host-to-device staging and on-device matching vs their limits
#   3. bench_extract --device cuda: resnet50 blocks (batch 64, 512 images) and resnet18 stages
#   4. bench_decode --device cuda: the MajajHong-sized decoding, and its share of core.analyze on the demo,
#      with each way to the L-BFGS directions (compact form: the CUDA default; two-loop recursion)
#   4b. bench_store_read: the re-scoring's scattered-column read of a store on the node's cores, and
#      one-split matching from a store on the GPU against its reads and the matching from memory
#   5. the default test suite on the GPU machine (W&B tests deselected: wandb is not on the device, nor
#      numba; the device's own timm may predate the project's minimum, 1.0.31: tests of test_maxvit then fail)
set -uo pipefail
OUT=${OUT:-/tmp/unitmatch-gpu-out}
LOGS=${LOGS:-/tmp/unitmatch-gpu-logs}
mkdir -p "$OUT" "$LOGS" /tmp/site /tmp/pkg
ln -sfn "$PWD" /tmp/pkg/unitmatch            # the repository root is the package unitmatch
# the tests read ../shared/data (timm's results table, the V4 recordings), which a device run does not
# send: a copy travels in .device/shared when present (cp -r ../shared/data .device/shared/)
[ -e ../shared ] || { [ -d .device/shared/data ] && ln -sfn "$PWD/.device/shared" ../shared; }
if [ "${KIT:-1}" = 1 ]; then                 # KIT=0: a dry run where every package is installed already
  tar -xJf .device/site.tar.xz -C /tmp/site || { echo "no .device/site.tar.xz: run ../shared/tools/device-kit build"; exit 2; }
  export PYTHONPATH=/tmp/site:/tmp/pkg
  # wheels beside the kit (isal): installed into the same folder; without isal the digests use zlib's CRC-32
  if compgen -G ".device/whl/*.whl" > /dev/null; then
    ${PYTHON:-python3} -m pip install -q --no-deps --no-index --target /tmp/site .device/whl/*.whl || echo "the wheels in .device/whl did not install"
  fi
else
  export PYTHONPATH=/tmp/pkg
fi
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=disabled HF_HUB_OFFLINE=1
# NGC's PyTorch images force TF32 on cuBLAS matmuls through this variable: extraction refuses it and the
# engine's float32 checks assume full float32, so it is logged, then unset for every step
env | grep -i tf32 > "$LOGS/tf32_env.txt" || true
unset TORCH_ALLOW_TF32_CUBLAS_OVERRIDE
PY=${PYTHON:-python3}

BUDGET=${BUDGET:-560}   # seconds for the whole script: a device command may run 600
step() {  # step NAME SECONDS COMMAND...: run with a time limit (cut to what the budget has left),
  local name=$1 limit=$2; shift 2  # log to $LOGS/NAME.log, record the status in steps.txt
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ ^(${ONLY})$ ]]; then return; fi   # ONLY: a regex of step names
  local left=$((BUDGET - SECONDS - 10)) t0=$SECONDS
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "$name skipped: budget spent" | tee -a "$LOGS/steps.txt"; return; fi
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$LOGS/steps.txt"
  tail -n 25 "$LOGS/$name.log"
  tar -czf "$OUT/logs.tgz" -C "$LOGS" .
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
  $PY -c "from unitmatch.core import integrity as i; print('chunk CRC-32 from', i._crc32.__module__)"
  echo "TF32 variables at the start: $(tr '\n' ' ' < "$LOGS/tf32_env.txt")"; } \
  | tee "$LOGS/machine.txt"

step gpu_tests 150 $PY -m pytest -m gpu -q -p no:cacheprovider -k "not wandb"
# 1M units, one split: about 140 s on an H200 (2026-11-27; most of it the benchmark's own set-up and
# its nine timed engine runs), so the 10-split cost is measured at 100k units
step bench_match 230 $PY benchmarks/bench_match.py --device cuda --splits 1 --profile --json "$LOGS/bench_match.json"
# and a sweep's default work: 10 splits with 100 permuted copies of each neuron (25,856 rows), with the
# default (float16 tensor-core) and the float32 GEMMs
step bench_match_10 150 $PY benchmarks/bench_match.py --device cuda --sizes 100000 --splits 1 10 \
  --permutations 100 --json "$LOGS/bench_match_10.json"
step bench_extract_resnet50 150 $PY benchmarks/bench_extract.py --device cuda --model resnet50 --images 512 --batch 64 \
  --workers 4 8 --writer-threads 8 16
step bench_extract_resnet18 60 $PY benchmarks/bench_extract.py --device cuda --model resnet18 --layers stages \
  --images 512 --batch 64 --workers 4 --writer-threads 8
# resnet18's stages reached 40% of the writes alone on an H200 (2026-11-27): do more batches waiting
# for the disk (the sink's queue, 2 by default) close the gap? (pageable buffers were measured then)
step bench_extract_queue 40 $PY benchmarks/bench_extract.py --device cuda --model resnet18 --layers stages \
  --images 512 --batch 64 --workers 4 --writer-threads 8 --sink-queue 8
# both ways to the L-BFGS directions (the compact form is the CUDA default, unmeasured on a GPU until then);
# two demo runs each: the first pays for CUDA loading each kernel on its first use
step bench_decode 150 $PY benchmarks/bench_decode.py --device cuda --cases majaj demo --sklearn-splits 1 --repeats 2 \
  --directions compact two-loop
# the float64 re-scoring's read of a null's candidates (host work after the GPU's block pass): on the
# node's cores (up to 16 read threads) against one thread and a whole checked read (3200 images, 1.7 GB);
# then one-split matching from the store on the GPU (blocks read on the read threads, staged) against the
# reads alone and the same matching from host memory, and the sweep's reduction of the same blocks (Dask
# threads; each block task staged in four pieces through pinned buffers); blocks of 65,536 units (the GPU
# default would make the layer one block, its read and its products one after the other)
step bench_store_read 150 $PY benchmarks/bench_store_read.py --images 3200 --layers 1 --units 262144 --repeats 5 \
  --null-columns 100000 --match-neurons 256 --stream-device cuda --stream-block-units 65536
# deselected: what needs wandb (not in the kit) or a package index (none on the device), and numba's
# kernel (llvmlite's 57 MiB wheel and the kit's 37 MB exceed what a device run carries, 64 MiB: the
# engine's CPU path falls back to torch's ops there, with a warning; the kernel's tests run in CI)
step suite 300 $PY -m pytest -q -p no:cacheprovider -n 8 -k "not wandb and not fused" --ignore tests/test_kernels.py \
  --deselect tests/test_report.py \
  --deselect tests/test_package.py::test_wheel_installs_in_a_fresh_venv_and_runs_the_demo_from_another_directory
cat "$LOGS/steps.txt"
