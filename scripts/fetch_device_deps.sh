#!/usr/bin/env bash
# Fill .device-deps/ (git-ignored) with everything scripts/device_check.sh needs on a GPU machine that has no
# network: the pinned ggml sdist, the wheels to build and test tortoise-ggml offline, and random-weight models.
# torch does not travel (~200 MB against the device tool's 64 MiB), so the models are made here, where torch and
# tortoise-tts are installed, and travel as skeletons (scripts/device_models.py: the converter's GGUF without the
# large tensors' numbers, a few hundred KB) that device_check.sh fills with seeded random numbers, without torch.
#
#   bash scripts/fetch_device_deps.sh [--python-version 3.12[,3.11]] [--cmake auto|yes|no] [--dest DIR]
#                                     [--full-size] [--no-models] [--max-mib 60]
#
# Run it in the repository root of the checkout the device tool sends, then name the folder in `carry`:
#   run(command="bash scripts/device_check.sh", carry=[".device-deps"], timeout_s=600)
#
# --python-version: the device's Python (X.Y, comma-separated for several); default this machine's. The
#                   nvidia-h200 image's python3 is 3.12 (/work/.library/device/KINDS.md). One version's wheels
#                   are ~31 MiB (numpy 15): two do not fit beside the rest.
# --cmake:          the cmake wheel is ~29 MiB. auto (default): included only when the folder stays under
#                   --max-mib; device_check.sh otherwise uses the cmake on PATH (>= 3.21; the H200 image has one).
# --full-size:      also the api.py-size models (f16 and q8_0; AR, diffusion, CLVP, vocoder, HiFi-GAN when the
#                   oracle makes it) for the benchmarks: ~4 GB of checkpoints are written and converted here first.
# --no-models:      skip the models (they need torch + tortoise-tts here: pip install ".[test]" &&
#                   pip install --no-deps tortoise-tts==3.0.0).
#
# Models (DEST/models/*.gguf.skel; device_check.sh unpacks them):
#   tortoise-small-f32            tests/reference/oracle.py save --size small (head size 32, as tests/conftest.py)
#   tortoise-small-h64-f32        the same with half the heads: head size 64 in the GPT-2, conditioning-encoder and
#                                 diffusion attention (ggml's CUDA flash attention has kernels for head sizes 40,
#                                 64, 72, 80, 96, 112, 128, 256 and refuses 32; the release models use 64)
#   tortoise-small-h64-q8_0       its q8_0 conversion
# DEST/manifest.json records the sdist, wheels and models (sha256) and the commit they were made from.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
DEST=$ROOT/.device-deps
PY_VERSIONS=""
CMAKE_WHEEL=auto
MODELS=yes
FULL=no
MAX_MIB=60

usage() { sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --dest) DEST=$(realpath -m "$2"); shift 2 ;;
        --python-version) PY_VERSIONS=$2; shift 2 ;;
        --cmake) CMAKE_WHEEL=$2; shift 2 ;;
        --no-models) MODELS=no; shift ;;
        --full-size) FULL=yes; shift ;;
        --max-mib) MAX_MIB=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "fetch_device_deps: unknown option $1" >&2; usage 2 ;;
    esac
done
[[ $CMAKE_WHEEL =~ ^(auto|yes|no)$ ]] || { echo "--cmake takes auto, yes or no" >&2; exit 2; }
[[ -n $PY_VERSIONS ]] || PY_VERSIONS=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
IFS=, read -r -a PYVS <<<"$PY_VERSIONS"

start=$SECONDS
log() { echo "fetch_device_deps [$((SECONDS - start)) s]: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
cd "$ROOT"

# Python on this tree's code: an editable install of another checkout (scikit-build-core's redirecting finder)
# would otherwise shadow it
tree_py() {
    "$PYTHON" -c 'import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
sys.path.insert(0, sys.argv[1]); mod = sys.argv[2]; sys.argv = sys.argv[2:]
runpy.run_module(mod, run_name="__main__", alter_sys=True)' "$ROOT" "$@"
}

mkdir -p "$DEST"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fetch_device_deps.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
rm -rf "$DEST/wheels" "$DEST/models" "$DEST"/*.tar.gz "$DEST"/*.txt "$DEST/manifest.json"
mkdir -p "$DEST/wheels"

# --- the ggml sdist (vendor/ggml/prepare.py: pip download --no-deps --no-binary :all:, sha256 against the PIN) ----
log "ggml sdist (vendor/ggml/PIN)"
SDIST=$("$PYTHON" - "$ROOT/vendor/ggml" "$DEST" <<'EOF'
import shutil, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import prepare  # vendor/ggml/prepare.py
pin = prepare.read_pin()
src = prepare.fetch_sdist(pin, prepare.default_cache())   # cached in ~/.cache/tortoise-ggml after the first fetch
prepare.verify(src, pin)
dst = Path(sys.argv[2]) / pin["sdist"]
shutil.copyfile(src, dst)
prepare.verify(dst, pin)
print(dst)
EOF
) || die "could not fetch the pinned ggml sdist"
log "  $SDIST (sha256 matches vendor/ggml/PIN)"

# --- requirements, read from pyproject.toml ------------------------------------------------------------------------
# A declared runtime dependency that no file of the project imports is left out (it still travels if it is
# imported anywhere): scipy is ~37 MB and nothing imports it.
"$PYTHON" - "$ROOT" "$DEST" <<'EOF'
import pathlib, re, subprocess, sys
root, dest = map(pathlib.Path, sys.argv[1:])
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
meta = tomllib.loads((root / "pyproject.toml").read_text())
name = lambda req: re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip()
runtime, left_out = [], []
for req in meta["project"]["dependencies"]:
    mod = {"pyyaml": "yaml"}.get(name(req).lower(), name(req).lower().replace("-", "_"))
    used = subprocess.run(["grep", "-rqE", rf"^\s*(import|from) {mod}\b", "pyggml", "tortoise_ggml", "tests",
                           "benchmarks", "scripts"], cwd=root).returncode == 0
    (runtime if used or mod in ("cffi", "numpy") else left_out).append(req)
pytest = [r for r in meta["project"]["optional-dependencies"]["test"] if name(r) == "pytest"]
build = [r for r in meta["build-system"]["requires"]] + ["ninja"]
(dest / "requirements.txt").write_text("\n".join(runtime + pytest) + "\n")
(dest / "build-requirements.txt").write_text("\n".join(build) + "\n")
for r in left_out:
    print(f"fetch_device_deps: left out {r}: declared in pyproject.toml, imported by no file here", file=sys.stderr)
EOF

PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    PLATFORMS+=(--platform "${p}_x86_64")
done
download() {  # python version, destination, requirement args...
    local v=$1 d=$2; shift 2
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --implementation cp \
        --python-version "$v" "${PLATFORMS[@]}" -d "$d" "$@"
}
for v in "${PYVS[@]}"; do
    log "wheels for CPython $v (x86_64, manylinux <= 2.28)"
    download "$v" "$DEST/wheels" -r "$DEST/build-requirements.txt" -r "$DEST/requirements.txt" \
        || die "pip download failed for Python $v"
done

# --- models: converted here, packed as skeletons (scripts/device_models.py), rebuilt on the device -----------------
if [[ $MODELS == yes ]]; then
    "$PYTHON" -c "import torch, tortoise" 2>/dev/null || die "the models need torch and tortoise-tts here: " \
        "pip install '.[test]' && pip install --no-deps tortoise-tts==3.0.0 (or --no-models)"
    mkdir -p "$DEST/models"
    sizes=(small small-h64)
    [[ $FULL == yes ]] && sizes+=(full)
    log "random checkpoints (tortoise-tts 3.0.0's classes, tests/reference/oracle.py): ${sizes[*]}"
    "$PYTHON" - "$ROOT" "$WORK" "${sizes[@]}" <<'EOF'
import copy, os, sys
root, work, *sizes = sys.argv[1:]
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
sys.path[:0] = [os.path.join(root, "tests"), root]
os.environ.setdefault("ORACLE_THREADS", "2")
from reference import oracle
# head size 64 wherever flash attention runs (GPT-2 and its conditioning encoder: model_dim / heads; the
# diffusion decoder: model_channels / num_heads); CLVP's dim_head is 64 already
h64 = copy.deepcopy(oracle.CONFIGS["small"])
h64["autoregressive"]["heads"] = h64["autoregressive"]["model_dim"] // 64
h64["diffusion"]["num_heads"] = h64["diffusion"]["model_channels"] // 64
oracle.CONFIGS["small-h64"] = h64
for size in sizes:
    # full size: the benchmarked stages only (cvvp and the random-latent generators are not timed)
    names = [n for n in oracle.FILES if n not in ("cvvp", "rlg_auto", "rlg_diffuser")] if size == "full" else None
    oracle.save_all(size, os.path.join(work, size), seed=0, names=names)
    with open(os.path.join(work, size, "components.txt"), "w") as f:
        f.write(",".join(names or oracle.FILES))
EOF
    specs=(small:f32 small-h64:f32 small-h64:q8_0)
    [[ $FULL == yes ]] && specs+=(full:f16 full:q8_0)
    for spec in "${specs[@]}"; do
        size=${spec%%:*} type=${spec##*:}
        name=tortoise-$size-$type.gguf
        log "converting $size ($type), packing $name.skel"
        tree_py tortoise_ggml.convert "$WORK/$size" -o "$WORK/$name" --type "$type" -q \
            --components "$(cat "$WORK/$size/components.txt")" || die "conversion failed"
        stats=()
        [[ $type != f32 && -f $WORK/tortoise-$size-f32.gguf ]] && stats=(--stats-from "$WORK/tortoise-$size-f32.gguf")
        "$PYTHON" "$ROOT/scripts/device_models.py" pack "$WORK/$name" "${stats[@]}" -o "$DEST/models/$name.skel"
        "$PYTHON" - "$WORK/$name" "$size" "$type" >>"$WORK/models.jsonl" <<'EOF'
import json, os, sys
import gguf
path, size, type = sys.argv[1:]
r = gguf.GGUFReader(path)
fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
comps = next(v for k, v in fields.items() if k.endswith(".components"))
dims = {k.split(".", 1)[1]: v for k, v in fields.items()
        if k.endswith((".heads", ".num_heads", ".model_dim", ".model_channels"))}
print(json.dumps({"file": "models/" + os.path.basename(path) + ".skel", "size": size, "type": type,
                  "gguf_bytes": os.path.getsize(path), "components": list(comps), "dims": dims}))
EOF
        [[ $type == f32 ]] || rm -f "$WORK/$name"
    done
    rm -rf "$WORK/full" "$WORK"/tortoise-full-*.gguf    # gigabytes
fi

# --- cmake: only when it fits --------------------------------------------------------------------------------------
mib() { du -sb "$@" | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
if [[ $CMAKE_WHEEL != no ]]; then
    mkdir -p "$WORK/cmake"
    for v in "${PYVS[@]}"; do download "$v" "$WORK/cmake" "cmake>=3.21" || die "pip download cmake failed"; done
    with=$(awk -v a="$(mib "$DEST")" -v b="$(mib "$WORK/cmake")" 'BEGIN {printf "%.1f", a + b}')
    if [[ $CMAKE_WHEEL == yes ]] || awk -v w="$with" -v m="$MAX_MIB" 'BEGIN {exit !(w <= m)}'; then
        mv "$WORK"/cmake/*.whl "$DEST/wheels/"
        echo "cmake>=3.21" >>"$DEST/build-requirements.txt"
        log "cmake wheel included ($(mib "$DEST/wheels"/cmake-*.whl) MiB)"
    else
        log "cmake wheel ($(mib "$WORK/cmake") MiB) left out: the folder would be $with MiB (> $MAX_MIB);" \
            "device_check.sh uses the cmake on PATH (>= 3.21)"
    fi
fi

# --- manifest and size ---------------------------------------------------------------------------------------------
touch "$WORK/models.jsonl"
"$PYTHON" - "$ROOT" "$DEST" "$PY_VERSIONS" "$WORK/models.jsonl" <<'EOF'
import datetime, hashlib, json, os, subprocess, sys
root, dest, pyvs, models_jsonl = sys.argv[1:]
def sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
def git(*a):
    r = subprocess.run(["git", "-C", root, *a], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None
files = {}
for d, _, names in os.walk(dest):
    for n in sorted(names):
        p = os.path.join(d, n)
        if n != "manifest.json":
            files[os.path.relpath(p, dest)] = {"bytes": os.path.getsize(p), "sha256": sha(p)}
models = {m["file"]: m for m in map(json.loads, open(models_jsonl).read().splitlines())}
manifest = {
    "made": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "python_versions": pyvs.split(","), "files": files, "models": models,
    "total_bytes": sum(f["bytes"] for f in files.values()),
}
with open(os.path.join(dest, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
EOF

total=$(mib "$DEST")
log "contents (MiB):"
(cd "$DEST" && find . -type f -printf '%s %p\n' | sort -n | awk '{printf "  %7.2f  %s\n", $1 / 1048576, $2}') >&2
log "total $total MiB in $DEST (limit $MAX_MIB MiB; the device tool carries 64 MiB with the working tree)"
awk -v t="$total" -v m="$MAX_MIB" 'BEGIN {exit !(t <= m)}' || die "$DEST is $total MiB, over $MAX_MIB MiB"
log "OK"
