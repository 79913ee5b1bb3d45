#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with the pinned dependencies, and the
# reid_ops extension built in place. Safe to re-run (it reuses .venv and rebuilds only if needed).
#
#   REID_OPS_CUDA=1            build the CUDA kernels even without a visible GPU (CI: checks that they compile)
#   REID_OPS_CPU_ONLY=1        build without the CUDA kernels even when a GPU and a CUDA toolkit are present
#   TORCH_CUDA_ARCH_LIST=...   GPU architectures to compile for (default "8.0;9.0+PTX")
#   PYTHON=python3.11          interpreter used to create .venv
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "[setup] installing pinned dependencies (requirements.txt)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt

# CUDA kernels: built when torch is a CUDA build, a toolkit is found, and a GPU is visible or REID_OPS_CUDA=1.
# Without a GPU they cannot run; compiling them anyway adds about 2 minutes to a fresh set-up on 2 cores.
# The nvcc on PATH may be a wrapper, so point CUDA_HOME at the toolkit itself when it sits in the usual place.
if [ "${REID_OPS_CPU_ONLY:-0}" != "1" ] && [ "${REID_OPS_CUDA:-0}" != "1" ] \
    && ! { command -v nvidia-smi > /dev/null && nvidia-smi -L 2> /dev/null | grep -q '^GPU'; }; then
  echo "[setup] no GPU visible: building the CPU kernels only (REID_OPS_CUDA=1 also builds the CUDA kernels)"
  export REID_OPS_CPU_ONLY=1
fi
if [ "${REID_OPS_CPU_ONLY:-0}" != "1" ] && [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ "${REID_OPS_CPU_ONLY:-0}" != "1" ] && [ -n "${CUDA_HOME:-}" ]; then
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
  echo "[setup] CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# Rebuild only when the C++/CUDA sources, setup.py or the build settings changed.
stamp="$( (cat setup.py; find csrc -type f | sort | xargs cat; echo "${REID_OPS_CPU_ONLY:-0} ${CUDA_HOME:-} ${TORCH_CUDA_ARCH_LIST:-}") | sha256sum | cut -d' ' -f1)"
if [ "$(cat .venv/reid_ops.stamp 2>/dev/null)" = "$stamp" ] && .venv/bin/python -c "import reid_ops" 2>/dev/null; then
  echo "[setup] reid_ops is up to date"
else
  echo "[setup] building the reid_ops extension (a few minutes the first time)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation -e . \
    > .venv/reid_ops_build.log 2>&1 || { tail -n 40 .venv/reid_ops_build.log; echo "[setup] build failed: see .venv/reid_ops_build.log"; exit 1; }
  echo "$stamp" > .venv/reid_ops.stamp
fi
.venv/bin/python -c "import reid_ops, torch; print('[setup] reid_ops ready; CUDA kernels compiled:', reid_ops.compiled_with_cuda(), '| torch', torch.__version__)"
