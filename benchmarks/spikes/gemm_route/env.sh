# Sourced by run.sh and sweep.sh: GPU and compiler facts, the wheels installed into $SITE, the environment.
# Needs D (this folder) and W (the wheels' folder) set.
set -u
SITE=/tmp/site21
T0=$(date +%s)
el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
OUT=${OUT:-/tmp/spike21_out}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc not on PATH"
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
command -v nvcc >/dev/null || { [ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"; }
echo "CUDA_HOME=${CUDA_HOME:-unset}  g++: $(command -v g++ || echo MISSING)"

# 1. wheels -> $SITE (kept across calls while the machine stays warm)
if [ ! -f $SITE/tilelang/__init__.py ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE $W/*.whl 2>&1 \
    | grep -v "as the 'root' user" | tail -3
fi
# the slim z3 wheel carries libz3.so only; libtvm_compiler.so asks for libz3.so.4.15 (its SONAME)
[ -f $SITE/z3/lib/libz3.so ] && ln -sf libz3.so $SITE/z3/lib/libz3.so.4.15
el "wheels installed: $(du -sh $SITE 2>/dev/null | cut -f1)"

# /tmp/site_cb: cuda-bindings from an earlier call of the project's .gpu/setup.sh on this warm machine, if any
# (only used by spike.py's fallback to TileLang's NVRTC backend when nvcc cannot compile, e.g. no g++)
CB=""; [ -d /tmp/site_cb/cuda ] && CB=/tmp/site_cb:
export PYTHONPATH=$SITE:$CB$PWD/src PYTHONUNBUFFERED=1 TILELANG_CACHE_DIR=/tmp/tl_cache21 SPIKE_SRC_DIR=$OUT/src
# torch >= 2.10 exposes __dlpack_c_exchange_api__ itself; otherwise keep tvm-ffi from JIT-building its torch addon
python3 -c "import torch, sys; sys.exit(0 if hasattr(torch.Tensor, '__dlpack_c_exchange_api__') else 1)" \
  || { echo "torch lacks __dlpack_c_exchange_api__: TVM_FFI_DISABLE_TORCH_C_DLPACK=1"; export TVM_FFI_DISABLE_TORCH_C_DLPACK=1; }
python3 -c "import tilelang, z3, tvm_ffi; print('tilelang', tilelang.__version__, 'tvm_ffi', tvm_ffi.__version__, 'z3', z3.get_version_string())" 2>&1 | tail -3
