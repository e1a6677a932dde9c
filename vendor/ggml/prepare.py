#!/usr/bin/env python3
"""Fetch, verify, unpack and patch the pinned ggml sources (called by CMakeLists.txt at configure time).

Prints the absolute path of the prepared source root (the folder holding ``ggml/CMakeLists.txt``).

Where the sources come from, first match wins:
  1. ``--source DIR`` / env ``TORTOISE_GGML_SOURCE``: an already unpacked libggml-python sdist (or a bare ggml
     tree), for machines with no package registry. It is copied, never modified in place, then patched.
  2. ``--sdist FILE`` / env ``TORTOISE_GGML_SDIST``: a downloaded sdist; its sha256 must match the pin.
  3. the user cache (``$XDG_CACHE_HOME/tortoise-ggml``, or ``--cache``), filled by ``pip download`` on first use:
     pip is the registry client the user already configured (mirrors, proxies, certificates).

The prepared tree is rebuilt whenever the pin, the patch series or the source changes (a stamp records them),
so a stale or half-patched tree is never compiled.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIN_FILE = HERE / "PIN"
PATCH_DIR = HERE / "patches"


class PrepareError(RuntimeError):
    pass


def read_pin(path: Path = PIN_FILE) -> dict[str, str]:
    pin = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pin[key.strip()] = value.strip()
    for key in ("package", "package_version", "sdist", "sha256", "ggml_version"):
        if key not in pin:
            raise PrepareError(f"{path}: missing '{key}'")
    return pin


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def patches() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tortoise-ggml"


def fetch_sdist(pin: dict[str, str], cache: Path) -> Path:
    target = cache / pin["sdist"]
    if target.is_file() and sha256_of(target) == pin["sha256"]:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        env = dict(os.environ)
        # pip can only fetch this sdist by preparing its metadata, which needs its own isolated build deps.
        env.pop("PIP_NO_BUILD_ISOLATION", None)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
               f"{pin['package']}=={pin['package_version']}"]
        print(f"-- tortoise-ggml: fetching {pin['package']}=={pin['package_version']} with pip", file=sys.stderr)
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        got = Path(tmp) / pin["sdist"]
        if r.returncode != 0 or not got.is_file():
            raise PrepareError(
                f"could not download {pin['package']}=={pin['package_version']} with pip "
                f"(exit {r.returncode}).\n{r.stdout[-3000:]}\n"
                "Offline? Set TORTOISE_GGML_SDIST to the sdist file or TORTOISE_GGML_SOURCE to an unpacked copy.")
        os.replace(got, target)
    return target


def verify(path: Path, pin: dict[str, str]) -> None:
    digest = sha256_of(path)
    if digest != pin["sha256"]:
        raise PrepareError(f"{path}: sha256 {digest} does not match the pin {pin['sha256']} (vendor/ggml/PIN)")


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    if sys.version_info >= (3, 12):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        if not (dest / member.name).resolve().is_relative_to(root) or member.issym() or member.islnk():
            raise PrepareError(f"refusing to unpack suspicious archive member {member.name!r}")
    tar.extractall(dest)


def is_ggml_tree(path: Path) -> bool:
    return (path / "CMakeLists.txt").is_file() and (path / "include" / "ggml.h").is_file()


def source_root(path: Path) -> Path:
    """The folder that holds ggml/ (an unpacked sdist's root)."""
    if is_ggml_tree(path / "ggml"):
        return path
    raise PrepareError(f"{path} is neither an unpacked {read_pin()['sdist']} nor a ggml source tree")


def run_patch(root: Path, patch: Path, *extra: str) -> subprocess.CompletedProcess:
    if shutil.which("patch"):
        cmd = ["patch", "-p1", "--batch", "--silent", "-d", str(root), "-i", str(patch), *extra]
    elif shutil.which("git"):
        # git apply works outside a repository; translate the two flags we use.
        flags = ["--check" if e == "--dry-run" else "--reverse" if e == "-R" else e for e in extra if e != "--forward"]
        cmd = ["git", "apply", *flags, str(patch)]
        return subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    else:
        raise PrepareError("applying vendor/ggml/patches needs `patch` or `git` on PATH")
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def apply_patches(root: Path) -> None:
    for p in patches():
        if run_patch(root, p, "--forward", "--dry-run").returncode == 0:
            r = run_patch(root, p, "--forward")
            if r.returncode != 0:
                raise PrepareError(f"{p.name} failed to apply:\n{r.stdout}")
        elif run_patch(root, p, "-R", "--dry-run").returncode == 0:
            print(f"-- tortoise-ggml: {p.name} already applied in the source", file=sys.stderr)
        else:
            raise PrepareError(f"{p.name} does not apply to the ggml sources in {root}:\n"
                               f"{run_patch(root, p, '--forward', '--dry-run').stdout}")


def stamp_for(pin: dict[str, str], origin: str) -> str:
    h = hashlib.sha256()
    h.update(PIN_FILE.read_bytes())
    h.update(origin.encode())
    for p in patches():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def prepare(dest: Path, source: Path | None = None, sdist: Path | None = None, cache: Path | None = None) -> Path:
    pin = read_pin()
    dest = dest.resolve()
    if source is not None:
        source = source.resolve()
        if not (is_ggml_tree(source) or is_ggml_tree(source / "ggml")):
            source_root(source)  # raises the explanatory error
        origin = f"source:{source}"
    else:
        sdist = sdist.resolve() if sdist else fetch_sdist(pin, cache or default_cache())
        verify(sdist, pin)
        origin = f"sdist:{pin['sha256']}"
    stamp = stamp_for(pin, origin)
    stamp_file = dest / ".tortoise-ggml-stamp"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return source_root(dest)

    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        if source is not None:
            # a bare ggml tree goes under src/ggml so patches (paths ggml/...) apply the same way
            unpacked = tmp / "src"
            shutil.copytree(source, unpacked / "ggml" if is_ggml_tree(source) else unpacked, symlinks=True)
        else:
            with tarfile.open(sdist) as tar:
                _safe_extract(tar, tmp)
            tops = [p for p in tmp.iterdir() if p.is_dir()]
            if len(tops) != 1:
                raise PrepareError(f"{sdist}: expected one top-level folder, found {[p.name for p in tops]}")
            unpacked = tops[0]
        root = source_root(unpacked)
        apply_patches(root)
        os.replace(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stamp_file.write_text(stamp)
    return source_root(dest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", required=True, type=Path, help="where the patched tree goes (outside git)")
    ap.add_argument("--source", type=Path, default=os.environ.get("TORTOISE_GGML_SOURCE") or None)
    ap.add_argument("--sdist", type=Path, default=os.environ.get("TORTOISE_GGML_SDIST") or None)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--print-version", action="store_true", help="print the pinned ggml version and exit")
    a = ap.parse_args(argv)
    try:
        if a.print_version:
            print(read_pin()["ggml_version"])
            return 0
        print(prepare(a.dest, a.source, a.sdist, a.cache))
    except PrepareError as e:
        print(f"tortoise-ggml: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
