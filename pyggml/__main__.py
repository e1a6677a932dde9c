"""``python -m pyggml info``: the ggml version, the backends this build has, and the devices it sees."""
import argparse
import sys

import pyggml


def info() -> None:
    commit = pyggml.commit()
    print(f"ggml {pyggml.version()}" + (f" (commit {commit})" if commit and commit != "unknown" else ""))
    print(f"backends: {', '.join(pyggml.backend_names())}")
    print("devices:")
    for d in pyggml.devices():
        mem = f", {d.memory_free / 2**30:.1f} of {d.memory_total / 2**30:.1f} GiB free" if d.memory_total else ""
        print(f"  {d.name} [{d.kind}] {d.description}{mem}")
    with pyggml.Backend("cpu", threads=1) as cpu:
        extra = [b.name for b in cpu.extra_buffer_types()]
    print(f"CPU weight layouts: {', '.join(extra) or 'none'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyggml", description=__doc__)
    parser.add_argument("command", choices=["info"])
    parser.parse_args(argv)
    info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
