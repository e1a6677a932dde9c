#!/usr/bin/env bash
# One prepared device run: install offline, build with CUDA for the GPU found, check every stage on the GPU against
# the CPU backend, and time the stages. Made for one device-tool command of at most 10 minutes:
#
#   run(command="bash scripts/device_check.sh", carry=[".device-deps"], timeout_s=600)
#
# Needs the deps folder that scripts/fetch_device_deps.sh fills where there is network (wheels for this machine's
# Python, the ggml sdist, model skeletons), nvcc (PATH, $CUDA_HOME/bin or /usr/local/cuda/bin) and cmake >= 3.21
# (PATH, or a cmake wheel in the deps folder). No network: pip runs with --no-index on the deps folder alone.
#
#   bash scripts/device_check.sh [--cpu] [--deps DIR] [--out DIR] [--budget SECONDS] [--work DIR] [--reuse]
#
# Phases (each timed; figures.json has them): env (tools, GPU, Python matching the wheels), venv (fresh, offline
# install), build (pip install . with GGML_CUDA=ON for this GPU's architecture only), info (python -m pyggml
# info), models (skeletons -> GGUF), tests (tests/pyggml/test_cuda_concat.py, tests/test_cuda_stages.py: every
# stage on CUDA against the CPU backend), bench-full (benchmarks/bench_*.py --backend cuda: they need torch, so
# skipped in the offline venv, saying so), bench (scripts/device_bench.py: every stage timed on cuda and cpu on the
# carried models).
#
# --cpu     the same flow on the CPU backend (a GGML_CUDA=OFF build; the stage tests compare the CPU's fused
#           kernels with the plain ggml ops the CUDA backend runs; plus cuda-lint, scripts/cuda_lint.py): the
#           rehearsal for a machine without a GPU.
# --out     where the log and figures go (default $OUT, which the device tool sets, else ./device-out):
#           device-check.log, build.log, junit.xml, stages.json, bench.json, figures.json.
# --budget  seconds the whole run may take (default 540, a 600 s command with a minute to spare): phases that
#           would not fit are skipped, and say so.
# --work    scratch (venv, build tree, unpacked models; default /tmp/tortoise-device-check).
# --reuse   keep the venv and build of an earlier run in --work (a rerun on the same warm machine): tests and
#           benchmarks only.
# Environment: PYTHON (the interpreter for the venv; default the first of python3.12, 3.11, 3.10, python3 whose
# version the deps folder has wheels for), CUDA_ARCH (e.g. 90; default from nvidia-smi's compute_cap),
# JOBS (build parallelism; default nproc).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=cuda
DEPS=$ROOT/.device-deps
OUTDIR=${OUT:-$ROOT/device-out}
BUDGET=540
WORK=${TMPDIR:-/tmp}/tortoise-device-check
REUSE=no
CUBLAS_DEFS=()
JOBS=${JOBS:-$(nproc)}
while [[ $# -gt 0 ]]; do
    case $1 in
        --cpu) MODE=cpu; shift ;;
        --deps) DEPS=$(realpath -m "$2"); shift 2 ;;
        --out) OUTDIR=$(realpath -m "$2"); shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --work) WORK=$(realpath -m "$2"); shift 2 ;;
        --reuse) REUSE=yes; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "device_check: unknown option $1" >&2; exit 2 ;;
    esac
done

mkdir -p "$OUTDIR" "$WORK"
LOG=$OUTDIR/device-check.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
cd "$ROOT"
export PYTHONUNBUFFERED=1

T0=$(date +%s.%N)
PHASES=$WORK/phases.tsv
: >"$PHASES"
FAILED=()
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.0f", b - a}'; }
left() { echo $((BUDGET - $(elapsed))); }
say() { echo "[device_check $(printf '%4s' "$(elapsed)") s] $*"; }
PHASE="" PHASE_T=""
begin() { PHASE=$1; PHASE_T=$(date +%s.%N); say "=== $1: $2"; }
end() {  # status [note]
    local dt
    dt=$(awk -v a="$PHASE_T" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
    printf '%s\t%s\t%s\t%s\n' "$PHASE" "$dt" "$1" "${2:-}" >>"$PHASES"
    say "=== $PHASE: $1 in $dt s${2:+ ($2)}"
    [[ $1 == failed ]] && FAILED+=("$PHASE")
    return 0
}
skip() { begin "$1" "skipped"; end skipped "$2"; }
finish() {
    local py=${VPY:-python3}
    command -v "$py" >/dev/null 2>&1 || py=python3
    "$py" - "$OUTDIR" "$PHASES" "$MODE" "$BUDGET" "${FAILED[*]:-}" <<'EOF' || true
import json, os, sys, xml.etree.ElementTree as ET
out, phases, mode, budget, failed = sys.argv[1:]
fig = {"mode": mode, "budget_s": float(budget), "failed_phases": failed.split(), "phases": []}
for line in open(phases):
    name, secs, status, note = (line.rstrip("\n").split("\t") + [""])[:4]
    fig["phases"].append({"phase": name, "seconds": float(secs), "status": status, "note": note})
fig["total_s"] = sum(p["seconds"] for p in fig["phases"])
env = os.path.join(out, "env.json")
if os.path.exists(env):
    fig["machine"] = json.load(open(env))
    os.remove(env)
junit = os.path.join(out, "junit.xml")
if os.path.exists(junit):
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    fig["tests"] = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    fig["tests"]["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s
                              if c.find("failure") is not None or c.find("error") is not None]
for name in ("stages.json", "bench.json"):
    p = os.path.join(out, name)
    if os.path.exists(p):
        fig[name[:-5]] = json.load(open(p))
json.dump(fig, open(os.path.join(out, "figures.json"), "w"), indent=1)
print("\nphase                 seconds  status")
for p in fig["phases"]:
    print(f"{p['phase']:20s} {p['seconds']:8.1f}  {p['status']}{'  (' + p['note'] + ')' if p['note'] else ''}")
print(f"{'total':20s} {fig['total_s']:8.1f}")
if "tests" in fig:
    t = fig["tests"]
    print(f"tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
    for f in t["failed"]:
        print(f"  FAILED {f}")
st = fig.get("stages", {}).get("stages", {})
if st:
    worst = sorted(((v.get("rel_err", 0) / v["tol"], k, v) for k, v in st.items() if "rel_err" in v), reverse=True)
    print("largest stage errors (relative, tolerance):",
          "; ".join(f"{k} {v['rel_err']:.1e} ({v['tol']:.0e})" for _, k, v in worst[:5]))
EOF
    if [[ ${#FAILED[@]} -gt 0 ]]; then
        say "FAILED phases: ${FAILED[*]} (log: $LOG)"
        exit 1
    fi
    say "OK ($MODE): $OUTDIR"
    exit 0
}

# --- pip: the deps folder and nothing else -------------------------------------------------------------------------
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export PIP_CACHE_DIR=$WORK/pip-cache
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_REQUIRE_VIRTUALENV
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1

# --- 1. machine ----------------------------------------------------------------------------------------------------
begin env "machine, tools, deps folder"
echo "mode $MODE, budget $BUDGET s, deps $DEPS, out $OUTDIR, work $WORK, jobs $JOBS"
uname -a; echo "cpus: $(nproc)"; free -g 2>/dev/null | head -2; df -h "$WORK" 2>/dev/null | tail -1
ok=yes
if [[ ! -f $DEPS/manifest.json ]]; then
    say "no $DEPS/manifest.json: run scripts/fetch_device_deps.sh where there is network, and carry the folder"
    end failed "no deps folder"; finish
fi
PYVS=$(python3 -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['python_versions']))" \
       "$DEPS/manifest.json" 2>/dev/null || sed -n 's/.*"python_versions": *\[\([^]]*\)\].*/\1/p' "$DEPS/manifest.json" | tr -d '",')
echo "deps folder: wheels for Python $PYVS; made from commit $(grep -o '"git_commit": *"[0-9a-f]*"' "$DEPS/manifest.json" | grep -o '[0-9a-f]\{40\}')"
head=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "?")
echo "this tree: commit $head"
if [[ -z ${PYTHON:-} ]]; then
    for c in python3.12 python3.11 python3.10 python3; do
        v=$("$c" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
        [[ " $PYVS " == *" $v "* ]] && { PYTHON=$(command -v "$c"); break; }
    done
fi
if [[ -z ${PYTHON:-} ]]; then
    say "no Python here matches the deps folder's wheels ($PYVS); found:" \
        "$(for c in python3.13 python3.12 python3.11 python3.10 python3; do command -v $c >/dev/null && echo -n "$c=$($c -V 2>&1 | cut -d' ' -f2) "; done)"
    say "refetch with scripts/fetch_device_deps.sh --python-version X.Y for this machine"
    end failed "no matching Python"; finish
fi
echo "python: $PYTHON ($("$PYTHON" -V 2>&1))"
cmake_ok() { command -v cmake >/dev/null && cmake --version | head -1 | awk '{split($3, v, "."); exit !(v[1] > 3 || (v[1] == 3 && v[2] >= 21))}'; }
if grep -q '^cmake' "$DEPS/build-requirements.txt" 2>/dev/null; then
    echo "cmake: from the deps folder's wheel"
elif cmake_ok; then
    echo "cmake: $(command -v cmake) ($(cmake --version | head -1))"
else
    say "no cmake >= 3.21 on PATH and no cmake wheel in $DEPS: refetch with --cmake yes"; ok=no
fi
command -v ninja >/dev/null && echo "ninja: $(command -v ninja)" || echo "ninja: the deps folder's wheel"
echo "compiler: $(cc --version 2>/dev/null | head -1)"
ARCH=""
if [[ $MODE == cuda ]]; then
    NVCC=$(command -v nvcc || true)
    for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
        [[ -z $NVCC && -n $d && -x $d/bin/nvcc ]] && NVCC=$d/bin/nvcc
    done
    if [[ -z $NVCC ]]; then
        say "no nvcc (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"; ok=no
    else
        # the toolkit nvcc belongs to, as nvcc itself reports it (a wrapper script on PATH may sit elsewhere)
        top=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
        [[ -n $top && -d $top/bin ]] && NVCC=$(cd "$top/bin" && pwd)/nvcc
        NVCC=$(readlink -f "$NVCC")
        CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
        export CUDA_HOME CUDACXX=$NVCC PATH="$(dirname "$NVCC"):$PATH"
        for d in "$CUDA_HOME/lib64" "$CUDA_HOME/lib" "$CUDA_HOME/targets/x86_64-linux/lib"; do
            [[ -d $d ]] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        done
        echo "nvcc: $NVCC ($("$NVCC" --version | tail -1)); CUDA_HOME $CUDA_HOME"
        CUBLAS_DEFS=()
        if ! ls "$CUDA_HOME"/lib64/libcublas.so* "$CUDA_HOME"/targets/*/lib/libcublas.so* >/dev/null 2>&1; then
            # a toolkit without cuBLAS: the nvidia-cublas wheel of some Python on the machine (README: Building)
            lib=$(find /opt /usr/local /usr/lib -name 'libcublas.so.*' -path '*nvidia*' 2>/dev/null | sort | tail -1)
            if [[ -n $lib ]]; then
                d=$(dirname "$lib"); inc=$(dirname "$d")/include
                lt=$(ls "$d"/libcublasLt.so.* 2>/dev/null | sort | tail -1)
                echo "cuBLAS: not in $CUDA_HOME; using $lib (${lt:-no cublasLt}, headers $inc)"
                CUBLAS_DEFS=(-C "cmake.define.CUDA_cublas_LIBRARY=$lib" -C "cmake.define.CUDA_cublasLt_LIBRARY=$lt"
                             -C "cmake.define.CMAKE_CUDA_FLAGS=-I$inc")
                LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            else
                say "no cuBLAS in $CUDA_HOME nor in an nvidia-cublas wheel: the build will fail to link"
            fi
        fi
        export LD_LIBRARY_PATH
    fi
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,memory.used,clocks.sm,clocks.mem \
            --format=csv || true
        cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
        ARCH=${CUDA_ARCH:-$cc}
    else
        say "no nvidia-smi"; ARCH=${CUDA_ARCH:-}
    fi
    [[ $ARCH =~ ^[0-9]+[a-z]?$ ]] || { say "cannot tell the GPU's compute capability (set CUDA_ARCH, e.g. 90)"; ok=no; }
    echo "CUDA architecture: $ARCH"
fi
"$PYTHON" - "$OUTDIR/env.json" "$MODE" "$ARCH" <<'EOF' || true
import json, os, platform, subprocess, sys
out, mode, arch = sys.argv[1:]
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return ""
json.dump({"mode": mode, "cuda_arch": arch, "cpus": os.cpu_count(), "python": platform.python_version(),
           "kernel": platform.release(), "gpu": sh("nvidia-smi --query-gpu=name,compute_cap,driver_version,"
                                                   "memory.total --format=csv,noheader") if mode == "cuda" else "",
           "nvcc": sh("nvcc --version | tail -1") if mode == "cuda" else "", "cmake": sh("cmake --version | head -1")},
          open(out, "w"))
EOF
[[ $ok == yes ]] && end ok "$("$PYTHON" -V 2>&1)${ARCH:+, sm_$ARCH}" || { end failed "missing tools"; finish; }

# --- 2. venv and offline install -----------------------------------------------------------------------------------
VENV=$WORK/venv
VPY=$VENV/bin/python
if [[ $REUSE == yes && -x $VPY && -f $WORK/built-$MODE ]]; then
    skip venv "--reuse: $VENV"
else
    begin venv "fresh venv, pip install --no-index from $DEPS/wheels"
    rm -rf "$VENV" "$WORK/built-$MODE"
    if ! "$PYTHON" -m venv "$VENV" 2>"$WORK/venv.err"; then
        # no ensurepip (Debian's python3 without python3-venv): bootstrap pip from its wheel
        cat "$WORK/venv.err"; rm -rf "$VENV"
        "$PYTHON" -m venv --without-pip "$VENV" && PIPWHL=$(ls "$DEPS"/wheels/pip-*.whl | head -1) &&
            "$VPY" "$PIPWHL/pip" install --quiet --no-index "$PIPWHL" || { end failed "venv"; finish; }
    fi
    if "$VPY" -m pip install --no-index --find-links "$DEPS/wheels" -r "$DEPS/build-requirements.txt" \
            -r "$DEPS/requirements.txt" >"$WORK/pip.log" 2>&1; then
        grep -E "^Successfully installed" "$WORK/pip.log" | fold -w 118
        end ok "$("$VPY" -m pip list 2>/dev/null | tail -n +3 | wc -l) packages"
    else
        tail -30 "$WORK/pip.log"; end failed "pip install"; finish
    fi
fi

# --- 3. build ------------------------------------------------------------------------------------------------------
SDIST=$(ls "$DEPS"/libggml_python-*.tar.gz 2>/dev/null | head -1)
if [[ $REUSE == yes && -f $WORK/built-$MODE ]]; then
    skip build "--reuse: built before"
else
    limit=$(( $(left) - 150 ))   # leave room for the tests
    [[ $limit -lt 60 ]] && { skip build "$(left) s left"; FAILED+=(build); finish; }
    begin build "pip install . (GGML_CUDA=$([[ $MODE == cuda ]] && echo "ON, sm_$ARCH" || echo OFF), $JOBS jobs, at most $limit s)"
    defs=(-C "cmake.define.GGML_NATIVE=ON" -C "build-dir=$WORK/build/{wheel_tag}")
    if [[ $MODE == cuda ]]; then
        # one real architecture, no PTX; only the flash-attention kernels ggml builds by default
        defs+=(-C cmake.define.GGML_CUDA=ON -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=${ARCH}-real"
               -C "cmake.define.CMAKE_CUDA_COMPILER=$NVCC" -C cmake.define.GGML_CUDA_FA_ALL_QUANTS=OFF
               "${CUBLAS_DEFS[@]}")
    else
        defs+=(-C cmake.define.GGML_CUDA=OFF)
    fi
    rm -rf "$WORK/build"
    if TORTOISE_GGML_SDIST=$SDIST CMAKE_BUILD_PARALLEL_LEVEL=$JOBS timeout "$limit" \
            "$VPY" -m pip install --no-index --no-build-isolation --no-deps -v "${defs[@]}" . \
            >"$OUTDIR/build.log" 2>&1; then
        touch "$WORK/built-$MODE"
        grep -E "CMAKE_CUDA_ARCHITECTURES|CUDA Toolkit found|Using CUDA|ggml sources in|Build files have" \
            "$OUTDIR/build.log" | sort -u | head -8
        end ok "$(grep -c 'Building CUDA object' "$OUTDIR/build.log") CUDA objects"
    else
        rc=$?
        tail -40 "$OUTDIR/build.log"
        end failed "exit $rc$([[ $rc == 124 ]] && echo ": over $limit s")"; finish
    fi
fi

# --- 4. what the build sees ----------------------------------------------------------------------------------------
begin info "python -m pyggml info"
if "$VPY" -m pyggml info; then
    if [[ $MODE == cuda ]] && ! "$VPY" -c "import pyggml, sys; sys.exit(not pyggml.cuda_available())"; then
        end failed "the build has no CUDA device"
    else
        end ok
    fi
else
    end failed "pyggml does not import"
fi

# --- 5. models -----------------------------------------------------------------------------------------------------
begin models "unpacking the model skeletons (scripts/device_models.py)"
MODELS=$WORK/models
mkdir -p "$MODELS"
n=0
for skel in "$DEPS"/models/*.gguf.skel; do
    [[ -f $skel ]] || continue
    name=$(basename "$skel" .skel)
    if [[ $name == *full* && $(left) -lt 300 ]]; then echo "not unpacking $name: $(left) s left"; continue; fi
    "$VPY" scripts/device_models.py unpack "$skel" -o "$MODELS/$name" && n=$((n + 1))
done
[[ $n -gt 0 ]] && end ok "$n files" || end failed "no models"
F32=$MODELS/tortoise-small-h64-f32.gguf
Q8=$MODELS/tortoise-small-h64-q8_0.gguf
H32=$MODELS/tortoise-small-f32.gguf

# --- 5b. without a GPU: which nodes would the CUDA backend refuse (on the device, its own supports_op answers) -----
if [[ $MODE == cpu ]]; then
    begin cuda-lint "scripts/cuda_lint.py: every stage's graphs against the CUDA backend's supports_op rules"
    lint=()
    for f in "$MODELS"/tortoise-small-h64-*.gguf; do [[ -f $f ]] && lint+=("$f"); done
    "$VPY" scripts/cuda_lint.py "${lint[@]}" && end ok || end failed "nodes the CUDA backend would refuse"
    if [[ -f $MODELS/tortoise-small-f32.gguf ]]; then
        echo "(the plain small file, head size 32, for comparison: refusals expected)"
        "$VPY" scripts/cuda_lint.py "$MODELS/tortoise-small-f32.gguf" | grep -E "^REFUSED|^cuda_lint" || true
    fi
fi

# --- 6. tests ------------------------------------------------------------------------------------------------------
limit=$(( $(left) - 60 ))
if [[ $limit -lt 60 ]]; then
    skip tests "$(left) s left"
else
    begin tests "tests/pyggml/test_cuda_concat.py tests/test_cuda_stages.py (at most $limit s)"
    test_env=(TORTOISE_GGML_TEST_GGUF="$F32" TORTOISE_GGML_STAGES_REPORT="$OUTDIR/stages.json")
    [[ -f $Q8 ]] && test_env+=(TORTOISE_GGML_TEST_GGUF_Q8="$Q8")
    [[ -f $H32 ]] && test_env+=(TORTOISE_GGML_TEST_GGUF_H32="$H32")
    if [[ $MODE == cuda ]]; then test_env+=(TORTOISE_GGML_REQUIRE_CUDA=1); else test_env+=(TORTOISE_GGML_STAGES_TARGET=cpu); fi
    env "${test_env[@]}" timeout "$limit" "$VPY" -m pytest -p no:cacheprovider -q -rfEsx \
        --junitxml="$OUTDIR/junit.xml" tests/pyggml/test_cuda_concat.py tests/test_cuda_stages.py
    rc=$?
    [[ $rc == 0 ]] && end ok || end failed "pytest exit $rc$([[ $rc == 124 ]] && echo ": over $limit s")"
fi

# --- 7. benchmarks -------------------------------------------------------------------------------------------------
begin bench-full "benchmarks/bench_{autoregressive,clvp,diffusion,vocoder}.py --backend cuda"
if "$VPY" -c "import torch, tortoise" 2>/dev/null; then
    for b in autoregressive clvp diffusion vocoder; do
        [[ $(left) -lt 120 ]] && { echo "bench_$b: skipped, $(left) s left"; continue; }
        timeout $(( $(left) - 90 )) "$VPY" "benchmarks/bench_$b.py" --backend "$MODE" --threads "$JOBS" || true
    done
    end ok
else
    echo "SKIPPED benchmarks/bench_{autoregressive,clvp,diffusion,vocoder}.py --backend $MODE: they build full-size"
    echo "random checkpoints with tortoise-tts's classes under torch and time PyTorch beside ours; this offline venv"
    echo "has no torch (~200 MB, over the device tool's 64 MiB carry). The same stages are timed below on the"
    echo "carried models by scripts/device_bench.py (small random model; full size when the deps folder has it)."
    end skipped "no torch in the offline venv"
fi
limit=$(( $(left) - 25 ))
if [[ $limit -lt 30 ]]; then
    skip bench "$(left) s left"
else
    begin bench "scripts/device_bench.py (at most $limit s)"
    ggufs=()
    for f in "$F32" "$Q8" "$MODELS"/tortoise-full-*.gguf; do [[ -f $f ]] && ggufs+=(--gguf "$f"); done
    backends=cpu; [[ $MODE == cuda ]] && backends=cuda,cpu   # the GPU rows first: the deadline may cut the rest
    timeout "$limit" "$VPY" scripts/device_bench.py "${ggufs[@]}" --backends "$backends" --threads "$JOBS" \
        --deadline $((limit - 40)) --json "$OUTDIR/bench.json" 2>"$WORK/bench.err"
    rc=$?
    [[ $rc == 0 ]] && end ok || { tail -20 "$WORK/bench.err"; end failed "exit $rc"; }
fi
finish
