"""Build-time generator of the pyggml extension's C source (cffi API mode). Run by CMakeLists.txt.

    python pyggml/_ffi_build.py --include GGML_INCLUDE_DIR --out _ggml.c [--cuda]

cffi cannot parse ggml's headers as they are (platform macros, attributes, constant expressions in array sizes,
typedefs repeated across headers), so the headers are run through the C preprocessor against empty stand-ins for
the standard headers, and the few constructs pycparser rejects are rewritten. The generated declarations are the
whole public C API of ggml, ggml-alloc, ggml-backend, ggml-cpu and gguf (and ggml-cuda when built); the integer
``#define``s are kept too, their values taken from the compiler.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HEADERS = ["ggml.h", "ggml-alloc.h", "ggml-backend.h", "ggml-cpu.h", "gguf.h"]
CUDA_HEADERS = ["ggml-cuda.h"]

# The C standard headers that ggml's headers include; cffi knows every type they contribute.
FAKE_STD_HEADERS = ["stddef.h", "stdint.h", "stdbool.h", "stdio.h", "stdlib.h", "string.h", "assert.h",
                    "inttypes.h", "limits.h", "float.h", "math.h", "stdarg.h"]

# Declared by the 0.20.2 headers (ggml-cpu.h, ggml-cuda.h) but defined by no library: binding them would make the
# extension fail to import.
UNDEFINED_SYMBOLS = ["ggml_threadpool_get_n_threads", "ggml_backend_cuda_allreduce_tensor"]

# Callbacks into Python (see pyggml/log.py).
PYTHON_CALLBACKS = """
extern "Python" void _pyggml_log_callback(enum ggml_log_level level, const char * text, void * user_data);
extern "Python" void _pyggml_abort_callback(const char * error_message);
"""


def preprocess(include_dir: Path, headers: list[str], cc: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        fake = Path(tmp, "std")
        fake.mkdir()
        for h in FAKE_STD_HEADERS:
            (fake / h).write_text("")
        top = Path(tmp, "all.h")
        top.write_text("".join(f'#include "{h}"\n' for h in headers))
        cmd = [cc, "-E", "-P", "-nostdinc", "-I", str(fake), "-I", str(include_dir), "-U__GNUC__", "-U__clang__",
               "-D__attribute__(x)=", "-D_Noreturn=", "-D__restrict=", "-D__inline=", str(top)]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise SystemExit(f"preprocessing ggml headers failed ({' '.join(cmd)}):\n{r.stderr}")
        return r.stdout


def integer_defines(include_dir: Path, headers: list[str]) -> list[str]:
    """Names of the headers' object-like macros with an integer value, for `#define NAME ...` in the cdef."""
    names = []
    number = re.compile(r"^\(?\s*-?\s*(0x[0-9a-fA-F]+|\d+)[uUlL]*\s*\)?"
                        r"(\s*(<<|\||\*|\+)\s*\(?-?(0x[0-9a-fA-F]+|\d+)\)?)*$")
    for h in headers:
        for line in (include_dir / h).read_text().splitlines():
            m = re.match(r"\s*#\s*define\s+([A-Z][A-Z0-9_]*)\s+(.+?)\s*(//.*|/\*.*)?$", line)
            if m and number.match(m.group(2)) and m.group(1) not in names:
                names.append(m.group(1))
    return names


def cleanup(text: str) -> str:
    text = re.sub(r"\bextern\s+", "", text)
    # array sizes must be integer literals for pycparser
    text = re.sub(r"op_params\[[^\]]*\]", "op_params[16]", text)
    # `static const size_t GGML_TENSOR_SIZE = sizeof(struct ggml_tensor);` -> value read from the compiler
    text = re.sub(r"static const (\w+) (\w+) = [^;]+;", r"static const \1 \2;", text)
    # drop `static inline` helpers: bodies are not declarations
    text = re.sub(r"static inline[^{;]*\{(?:[^{}]|\{[^{}]*\})*\}", "", text)
    for sym in UNDEFINED_SYMBOLS:
        text = re.sub(r"[^;{}]*\b" + sym + r"\s*\([^;]*;", "", text)
    # the same typedef appears in several headers; pycparser rejects the repeats
    seen, out = set(), []
    for stmt in re.split(r"(?<=;)", text):
        key = " ".join(stmt.split())
        if key.startswith("typedef") and "{" not in key:
            if key in seen:
                continue
            seen.add(key)
        out.append(stmt)
    return "".join(out)


def build_cdef(include_dir: Path, cuda: bool, cc: str) -> tuple[str, list[str]]:
    headers = HEADERS + (CUDA_HEADERS if cuda else [])
    cdef = cleanup(preprocess(include_dir, headers, cc))
    defines = integer_defines(include_dir, headers)
    cdef += "\n" + "".join(f"#define {name} ...\n" for name in defines)
    cdef += "#define PYGGML_HAS_CUDA ...\n"
    cdef += PYTHON_CALLBACKS
    return cdef, headers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--include", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--cc", default=os.environ.get("CC") or shutil.which("cc") or "gcc")
    ap.add_argument("--module", default="pyggml._ggml")
    a = ap.parse_args(argv)

    import cffi

    cdef, headers = build_cdef(a.include, a.cuda, a.cc)
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    prelude = "".join(f'#include "{h}"\n' for h in headers)
    prelude += "#define PYGGML_HAS_CUDA %d\n" % int(a.cuda)
    ffi.set_source(a.module, prelude)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    ffi.emit_c_code(str(a.out))
    a.out.with_suffix(".cdef.h").write_text(cdef)  # kept beside the C file: what cffi saw, for debugging
    return 0


if __name__ == "__main__":
    sys.exit(main())
