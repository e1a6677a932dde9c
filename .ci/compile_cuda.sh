#!/usr/bin/env bash
# Compile the ggml CUDA sources that vendor/ggml/patches change, with nvcc for sm_90, on a machine without a GPU.
# CI cannot run CUDA, but it can prove that the patched kernels still build against the pinned ggml: the runtime
# check is tests/pyggml/test_cuda_concat.py, run where a GPU is present.
#
# Needs: python3 with pip, and nvcc 13 (PATH, $NVCC or /usr/local/cuda); without nvcc, the CUDA 13.0 compiler
# wheels are installed into the cache. cuBLAS headers (ggml-cuda's common.cuh includes cublas_v2.h) come from the
# nvidia-cublas wheel, also cached. Cache: $TORTOISE_GGML_CUDA_CACHE, default ~/.cache/tortoise-ggml/cuda-13.0.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
ARCH=${CUDA_ARCH:-sm_90}
CACHE=${TORTOISE_GGML_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tortoise-ggml/cuda-13.0}
CUBLAS_WHEEL_VERSION=13.0.2.14
# the CUDA 13.0 toolkit as PyPI wheels, for machines without nvcc
TOOLKIT_WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
                nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96)

start=$SECONDS
log() { echo "compile_cuda: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/compile_cuda.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$CACHE"

# --- nvcc ---------------------------------------------------------------------------------------------------------
NVCC=${NVCC:-$(command -v nvcc || true)}
[[ -z $NVCC && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
EXTRA_INC=()
if [[ -z $NVCC ]]; then
    TK=$CACHE/toolkit
    if [[ ! -x $TK/nvidia/cu13/bin/nvcc ]]; then
        log "no nvcc found: installing ${TOOLKIT_WHEELS[*]} into $TK"
        rm -rf "$TK.tmp"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$TK.tmp" "${TOOLKIT_WHEELS[@]}" \
            || die "could not install the CUDA compiler wheels"
        rm -rf "$TK" && mv "$TK.tmp" "$TK"
    fi
    NVCC=$TK/nvidia/cu13/bin/nvcc
    # the wheels put the headers in include/, not in the targets/ folder that nvcc.profile names
    EXTRA_INC=(-I "$TK/nvidia/cu13/include" -isystem "$TK/nvidia/cu13/include/cccl")
fi
log "nvcc: $NVCC ($("$NVCC" --version | tail -n 1))"

# --- cuBLAS headers -----------------------------------------------------------------------------------------------
CUBLAS_INC=$CACHE/cublas-$CUBLAS_WHEEL_VERSION/include
if [[ ! -f $CUBLAS_INC/cublas_v2.h ]]; then
    log "fetching the cuBLAS headers (nvidia-cublas==$CUBLAS_WHEEL_VERSION)"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: \
        -d "$WORK/wheel" "nvidia-cublas==$CUBLAS_WHEEL_VERSION" || die "could not download nvidia-cublas"
    # only the headers are kept: the wheel's libraries are hundreds of MB that a compile-only check never links
    "$PYTHON" - "$WORK/wheel" "$CUBLAS_INC" <<'EOF'
import glob, os, shutil, sys, zipfile
wheel_dir, dest = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(wheel_dir, "nvidia_cublas-*.whl"))
tmp = dest + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if "/include/" in name and name.endswith(".h"):
            with z.open(name) as src, open(os.path.join(tmp, os.path.basename(name)), "wb") as dst:
                shutil.copyfileobj(src, dst)
if not os.path.isfile(os.path.join(tmp, "cublas_v2.h")):
    sys.exit(f"{wheel} has no include/cublas_v2.h")
shutil.rmtree(dest, ignore_errors=True)
os.replace(tmp, dest)
EOF
    rm -rf "$WORK/wheel"
fi

# --- patched sources ----------------------------------------------------------------------------------------------
SRC=$("$PYTHON" "$ROOT/vendor/ggml/prepare.py" --dest "$WORK/ggml-src") || die "vendor/ggml/prepare.py failed"
CUDA_DIR=$SRC/ggml/src/ggml-cuda

# every .cu a patch touches, and for a touched header every .cu that includes it
mapfile -t touched < <(sed -n 's#^+++ b/ggml/src/ggml-cuda/\([^[:space:]]*\).*#\1#p' "$ROOT"/vendor/ggml/patches/*.patch | sort -u)
units=()
for f in "${touched[@]}"; do
    case $f in
        *.cu) units+=("$f") ;;
        *.cuh) mapfile -t -O "${#units[@]}" units < <(cd "$CUDA_DIR" && grep -rlE "#include \"(ggml-cuda/)?$(basename "$f")\"" --include='*.cu' . | sed 's#^\./##') ;;
    esac
done
mapfile -t units < <(printf '%s\n' "${units[@]}" | sort -u | sed '/^$/d')
[[ ${#units[@]} -gt 0 ]] || die "no vendor/ggml/patches/*.patch touches ggml/src/ggml-cuda: nothing to compile"

# ggml's own flags for a shared GGML_CUDA=ON build (ggml/src/CMakeLists.txt, ggml/src/ggml-cuda/CMakeLists.txt) and
# GGML_CUDA_NO_VMM as our CMakeLists.txt sets it
FLAGS=(-std=c++17 -arch="$ARCH" -O3 -use_fast_math -extended-lambda -Xcompiler -fPIC
       -I "$SRC/ggml/include" -I "$SRC/ggml/src" -I "$CUDA_DIR" -I "$CUBLAS_INC" "${EXTRA_INC[@]}"
       -DGGML_SCHED_MAX_COPIES=4 -DGGML_CUDA_PEER_MAX_BATCH_SIZE=128 -DGGML_CUDA_USE_GRAPHS -DGGML_CUDA_NO_VMM
       -D_GNU_SOURCE -D_XOPEN_SOURCE=600 -DGGML_BUILD -DGGML_SHARED -DGGML_BACKEND_BUILD -DGGML_BACKEND_SHARED)

for u in "${units[@]}"; do
    strict=(-Werror all-warnings)
    # upstream's ggml-cuda.cu trips GCC 12's -Wstringop-overflow false positive: warnings there are not ours
    [[ $u == ggml-cuda.cu ]] && strict=()
    t=$SECONDS
    mkdir -p "$WORK/obj/$(dirname "$u")"
    "$NVCC" "${FLAGS[@]}" "${strict[@]}" -c "$CUDA_DIR/$u" -o "$WORK/obj/${u%.cu}.o" \
        || die "nvcc -arch=$ARCH failed on ggml/src/ggml-cuda/$u"
    log "compiled ggml/src/ggml-cuda/$u for $ARCH in $((SECONDS - t)) s"
done
log "OK: ${#units[@]} patched CUDA source(s) compile for $ARCH ($((SECONDS - start)) s)"
