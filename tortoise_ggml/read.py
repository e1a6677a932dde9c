"""python -m tortoise_ggml.read: read a long text aloud, part by part (tortoise's read.py).

    python -m tortoise_ggml.read --model tortoise.gguf --textfile story.txt --voice me,pat&emma --preset fast
    python -m tortoise_ggml.read ... --regenerate 3,5          # redo parts 3 and 5, reuse the others
    python -m tortoise_ggml.read ... --ray auto                # parts on a Ray cluster's workers (--ray local: here)

The text (a file's lines joined with spaces, as tortoise) is cut where it holds '|', else by
split_and_recombine_text(200, 300); a part still too long for the model is split further. Each voice (``--voice``:
a comma list, one run each; ``a&b`` mixes voices; see tortoise_ggml.voices) gets a folder OUTPUT_PATH/VOICE with the
parts 0.wav, 1.wav, ... and, once every part exists, their concatenation (``--output_name``, combined.wav).
``--candidates K`` also keeps each part's K-1 runners-up as PART/1.wav ... PART/(K-1).wav.

Re-running the same command resumes: parts already written are kept (and parts.json, beside them, records the texts
and the seed, so a part whose text changed is made again). Every file is written to a temporary name and renamed,
so an interruption never leaves a partial part. Part j is made with a seed derived from --seed and j, so a serial
run, a resumed run and a Ray run give the same audio.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .api import write_wav  # atomic: temp file + rename
from .cli import add_generation_options, describe, fail, generation_overrides, user_errors
from .utils.files import atomic_path

log = logging.getLogger(__name__)

DESIRED_LENGTH, MAX_LENGTH = 200, 300      # tortoise's split_and_recombine_text defaults
# a part over the model's text limit is split again with these (desired, max) lengths before giving up
FINER_SPLITS = ((100, 150), (50, 75))
MANIFEST = "parts.json"
LOCAL = "local"                            # --ray local: start a Ray instance on this machine


class ReadError(ValueError):
    """Bad input or a failed part; the CLI prints it as one ``error:`` line (exit code 2)."""


# ------------------------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------------------------
def read_text(path: str) -> str:
    """The file's lines joined with spaces, as tortoise's read.py does."""
    try:
        with open(path, encoding="utf-8") as f:
            return " ".join(f.readlines())
    except FileNotFoundError:
        raise ReadError(f"no text file {path!r}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReadError(f"cannot read text file {path!r}: {e}") from None


def split_text(text: str, say=log.info) -> list[str]:
    """tortoise read.py's split: on '|' when the text has one, else split_and_recombine_text(200, 300). Empty
    pieces between '|' are skipped (and said)."""
    from .utils.text import split_and_recombine_text
    if "|" not in text:
        return split_and_recombine_text(text, DESIRED_LENGTH, MAX_LENGTH)
    say("Found the '|' character in the text: splitting there (remove every '|' to split automatically).")
    parts = []
    for i, piece in enumerate(text.split("|")):
        piece = re.sub(r"\s+", " ", piece).strip()
        if not piece or re.fullmatch(r"[\s.,;:!?]*", piece):
            say(f"text piece {i} (after the {_ordinal(i)} '|') is empty: skipped" if i else
                "the text before the first '|' is empty: skipped")
            continue
        parts.append(piece)
    return parts


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def fit_parts(parts: list[str], n_tokens, limit: int, say=log.info) -> list[str]:
    """Split parts whose token count (``n_tokens(text)``, tts()'s count with its padding) exceeds ``limit``
    further (split_and_recombine_text at FINER_SPLITS); ReadError naming the part when that cannot help."""
    from .utils.text import split_and_recombine_text
    out = []
    for i, part in enumerate(parts):
        pieces = [part]
        for desired, longest in FINER_SPLITS:
            if all(n_tokens(p) <= limit for p in pieces):
                break
            pieces = [q for p in pieces for q in (split_and_recombine_text(p, desired, longest)
                                                  if n_tokens(p) > limit else [p])]
        too_long = [p for p in pieces if n_tokens(p) > limit]
        if too_long:
            p = too_long[0]
            raise ReadError(f"part {i} ({_preview(part)}) is too long for the model: a piece of it is "
                            f"{n_tokens(p)} tokens after splitting, the limit is {limit} (split it by hand with '|')")
        if len(pieces) > 1:
            say(f"part {i} ({_preview(part)}) is over the model's {limit} tokens: split into {len(pieces)}")
        out.extend(pieces)
    return out


def _preview(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def plan_text(text: str, tokenizer, limit: int, say=log.info) -> list[str]:
    """The parts to speak: split_text, then fit_parts with the count tts() feeds the model (tokenizer.tts_length)."""
    parts = fit_parts(split_text(text, say), tokenizer.tts_length, limit, say)
    if not parts:
        raise ReadError("there is no text to read")
    return parts


def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed from ``seed`` and ``keys`` (numpy SeedSequence): independent streams per part, the same on
    every machine."""
    return int(np.random.SeedSequence([int(seed) % 2 ** 64, *keys]).generate_state(1, np.uint32)[0])


def part_seed(seed: int, index: int) -> int:
    """The seed part ``index`` is made with."""
    return derive_seed(seed, 1, index)


def voice_seed(seed: int) -> int:
    """The seed a voice's latents are made with (random voice, crops of long clips): one per run, so every part
    speaks with the same voice."""
    return derive_seed(seed, 0)


# ------------------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------------------
def write_json_atomic(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def read_wav(path: str) -> np.ndarray:
    import soundfile
    wav, _ = soundfile.read(path, dtype="float32", always_2d=False)
    return wav if wav.ndim == 1 else wav[:, 0]


def voice_folder(spec: str) -> str:
    """The output folder name of a --voice value: the voice name, or a path's last component (``a&b`` kept)."""
    names = [spec] if os.path.exists(spec) else spec.split("&")
    out = []
    for n in names:
        base = os.path.basename(os.path.normpath(n.strip()))
        if os.path.isfile(n):
            base = os.path.splitext(base)[0]
        out.append(base if base not in ("", ".", "..") else "voice")
    return "&".join(out)


def check_writable(folder: str) -> None:
    """Create ``folder`` and check a file can be written there (before any synthesis)."""
    try:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ReadError(f"output folder {folder!r} exists and is not a folder")
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test.{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ReadError(f"cannot write to output folder {folder!r}: {e.strerror or e}") from None


def parse_regenerate(value: str | None) -> list[int]:
    if value is None or not value.strip():
        return []
    try:
        return sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise ReadError(f"--regenerate takes comma-separated part numbers, got {value!r}") from None


# ------------------------------------------------------------------------------------------------------------------
# synthesis: one code path for serial runs and Ray workers
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One part of one voice."""
    voice: str          # the --voice value
    index: int
    text: str
    seed: int
    path: str           # where the part goes (PART.wav)
    attempts: int = 0


@dataclass
class VoiceData:
    """What a worker needs to speak with a voice: clips (22.05 kHz arrays) or latents, or neither (random)."""
    key: str
    clips: list | None = None
    latents: tuple | None = None
    seed: int = 0


@dataclass
class Settings:
    preset: str = "standard"
    candidates: int = 1
    cvvp_amount: float = 0.0
    overrides: dict = field(default_factory=dict)   # num_autoregressive_samples, diffusion_iterations, sampler, ...


class PartWorker:
    """Loads the model once and speaks parts with it (a Ray actor on a cluster, a plain object in a serial run)."""

    def __init__(self, model: str, device: str = "cpu", threads: int | None = None, tts=None, **tts_options):
        if tts is None:
            from .api import TextToSpeech
            tts = TextToSpeech(model, device=device, threads=threads, **tts_options)
        self.tts = tts
        self._voices: dict[str, dict] = {}

    def ready(self) -> bool:
        return True

    def _conditioning(self, voice: VoiceData, settings: Settings) -> dict:
        """tts() voice arguments, made once per voice: latents (computed from the clips, or drawn for a random
        voice, with the voice's seed), or the clips themselves when CVVP needs them."""
        key = (voice.key, settings.cvvp_amount > 0)
        if key not in self._voices:
            if voice.clips is not None and settings.cvvp_amount > 0:
                cond = {"voice_samples": voice.clips}          # CVVP compares with the clips' mels (per part)
            elif voice.clips is not None:
                cond = {"conditioning_latents": self.tts.get_conditioning_latents(voice.clips, seed=voice.seed)}
            elif voice.latents is not None:
                cond = {"conditioning_latents": voice.latents}
            else:
                cond = {"conditioning_latents": self.tts.get_random_conditioning_latents(seed=voice.seed)}
            self._voices[key] = cond
        return self._voices[key]

    def synthesize(self, job: Job, voice: VoiceData, settings: Settings, verbose: bool = False) -> list[np.ndarray]:
        """The part's candidates, best first: float32 (samples,) arrays at the output rate."""
        cond = self._conditioning(voice, settings)
        res = self.tts.tts_with_preset(job.text, preset=settings.preset, k=settings.candidates, seed=job.seed,
                                       cvvp_amount=settings.cvvp_amount, verbose=verbose, **cond,
                                       **settings.overrides)
        return [np.asarray(w, np.float32).reshape(-1) for w in (res if isinstance(res, list) else [res])]


def speak_parts(tts, parts: list[str], seed: int, k: int = 1, **kwargs):
    """``parts`` spoken one after the other, part j with part_seed(seed, j): (the k clips, each the concatenation
    of the parts' candidates of that rank, (1, samples); the summed per-stage seconds). generate's long texts."""
    clips, stats = [[] for _ in range(k)], {}
    for j, part in enumerate(parts):
        res, st = tts.tts_with_preset(part, k=k, seed=part_seed(seed, j), return_stats=True, **kwargs)
        for c, wav in enumerate(res if isinstance(res, list) else [res]):
            clips[c].append(np.asarray(wav, np.float32).reshape(1, -1))
        for name, v in st.items():
            stats[name] = stats.get(name, 0.0) + v
    out = [np.concatenate(c, axis=-1) for c in clips]
    return (out if k > 1 else out[0]), stats


def run_serial(worker: PartWorker, jobs, voices, settings, on_result, verbose: bool = False) -> None:
    for job in jobs:
        on_result(job, worker.synthesize(job, voices[job.voice], settings, verbose))


def run_ray(jobs, voices, settings, on_result, address: str, model: str, device: str = "cpu",
            threads: int | None = None, workers: int | None = None, retries: int = 2, num_cpus: int | None = None,
            on_dispatch=None, tts_options=None) -> None:
    """Speak ``jobs`` on Ray actors (PartWorker, each loading the model once); ``on_result(job, wavs)`` runs on the
    driver as each part comes back, so the driver writes every file. A part whose task fails (an exception, or its
    worker died: the worker is replaced) is retried up to ``retries`` times; parts that came back are never redone.
    ``address``: "local" starts a Ray instance here (``num_cpus``, default all); anything else is ray.init's address
    ("auto", "HOST:6379", "ray://HOST:10001"). The model path must exist on every worker node. ``on_dispatch(job,
    actor)``: called as each part is sent (tests use it)."""
    try:
        import ray
    except ImportError:
        raise ReadError("--ray needs Ray: pip install 'tortoise-ggml[ray]' (or pip install ray)") from None
    from ray.exceptions import RayActorError
    jobs = list(jobs)
    if not jobs:
        return
    started = False
    if not ray.is_initialized():
        try:
            if address == LOCAL:
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except Exception as e:  # ConnectionError, ValueError, RuntimeError for unreachable or bad addresses
            raise ReadError(f"cannot start or reach Ray at {address!r}: {e}") from None
        started = True
    try:
        cluster_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        threads = int(threads) if threads else min(4, cluster_cpus)   # per worker: Ray packs CPUs / threads a node
        cpus = max(1, min(threads, cluster_cpus))
        if workers is None:
            workers = max(1, cluster_cpus // cpus)
        workers = max(1, min(int(workers), len(jobs)))
        # a CUDA worker gets a GPU of its own (Ray sets CUDA_VISIBLE_DEVICES, so "cuda" is that one)
        actor_cls = ray.remote(num_cpus=cpus, num_gpus=1 if device.startswith("cuda") else 0)(PartWorker)

        def new_actor():
            return actor_cls.remote(model, device="cuda" if device.startswith("cuda") else device, threads=threads,
                                    **(tts_options or {}))

        voice_refs = {name: ray.put(v) for name, v in voices.items()}
        settings_ref = ray.put(settings)
        idle = [new_actor() for _ in range(workers)]
        pending, inflight, failure = deque(jobs), {}, None
        while pending or inflight:
            while pending and idle and failure is None:
                job, actor = pending.popleft(), idle.pop()
                ref = actor.synthesize.remote(job, voice_refs[job.voice], settings_ref)
                inflight[ref] = (job, actor)
                if on_dispatch is not None:
                    on_dispatch(job, actor)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                job, actor = inflight.pop(ref)
                try:
                    wavs = ray.get(ref)
                except RayActorError as e:             # the worker died (node lost, killed, out of memory, or
                    error = f"its worker died: {_last_line(e)}"   # its model could not be loaded)
                    actor = new_actor()
                except Exception as e:                 # the task raised
                    error = _last_line(getattr(e, "cause", None) or e)
                else:
                    idle.append(actor)
                    on_result(job, wavs)
                    continue
                idle.append(actor)
                job.attempts += 1
                if job.attempts > retries:
                    times = "once" if job.attempts == 1 else f"{job.attempts} times"
                    failure = failure or ReadError(f"part {job.index} of voice {job.voice!r} failed {times}; "
                                                   f"last: {error}")
                else:
                    log.warning("part %d of voice %r failed (%s): retrying", job.index, job.voice, error)
                    pending.appendleft(job)
            if failure is not None:
                pending.clear()                        # let the parts in flight finish and be written
        if failure is not None:
            raise failure
    finally:
        if started:
            ray.shutdown()


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


# ------------------------------------------------------------------------------------------------------------------
# the reader
# ------------------------------------------------------------------------------------------------------------------
class _Bar:
    """tqdm over parts: parts made, audio seconds made, time left."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.audio_s = 0.0
        if enabled and total:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="reading", unit="part", dynamic_ncols=True)

    def update(self, seconds: float) -> None:
        self.audio_s += seconds
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.audio_s:.1f} s of audio", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class VoiceRun:
    """One voice's folder: its manifest, its parts, its combined file."""

    def __init__(self, spec: str, folder: str, parts: list[str], seed: int | None, output_name: str):
        self.spec, self.folder, self.parts, self.output_name = spec, folder, parts, output_name
        self.manifest_path = os.path.join(folder, MANIFEST)
        self.previous = self._read_manifest()
        self.seed = seed if seed is not None else self.previous.get("seed")
        self.made: list = []

    def _read_manifest(self) -> dict:
        try:
            with open(self.manifest_path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def part_path(self, j: int) -> str:
        return os.path.join(self.folder, f"{j}.wav")

    def _made(self) -> list:
        """The manifest's record of the audio on disk: entry j is the text part j.wav was made from, None while
        it is (re)made; [] for a folder without a manifest (tortoise's read.py made it: its parts are trusted)."""
        made = self.previous.get("made")
        return made if isinstance(made, list) else []

    def todo(self, regenerate: list[int]) -> tuple[list[int], list[int], list[int]]:
        """(parts to make, parts reused, parts made again because their text changed). The manifest is then
        rewritten with the parts to make marked unmade, so an interruption before they are written cannot leave
        stale audio passing for new."""
        made, known = self._made(), "made" in self.previous
        make, reused, changed = [], [], []
        for j, text in enumerate(self.parts):
            recorded = made[j] if j < len(made) else None
            if j in regenerate or not os.path.isfile(self.part_path(j)) or (known and recorded is None):
                make.append(j)
            elif known and recorded != text:
                make.append(j)
                changed.append(j)
            else:
                reused.append(j)
        self.made = [None if j in make else text for j, text in enumerate(self.parts)]
        self.write_manifest()
        return make, reused, changed

    def write_manifest(self) -> None:
        write_json_atomic(self.manifest_path, {"seed": self.seed, "voice": self.spec, "texts": self.parts,
                                               "made": self.made})

    def write_part(self, j: int, wavs: list[np.ndarray], sample_rate: int) -> None:
        write_wav(self.part_path(j), wavs[0], sample_rate)
        if len(wavs) > 1:
            cand = os.path.join(self.folder, str(j))
            os.makedirs(cand, exist_ok=True)
            for c, wav in enumerate(wavs[1:], start=1):
                write_wav(os.path.join(cand, f"{c}.wav"), wav, sample_rate)
        self.made[j] = self.parts[j]
        self.write_manifest()

    def combine(self, sample_rate: int) -> str | None:
        """Write the combined file when every part exists; its path, or None."""
        paths = [self.part_path(j) for j in range(len(self.parts))]
        if not all(os.path.isfile(p) for p in paths):
            return None
        out = os.path.join(self.folder, self.output_name)
        write_wav(out, np.concatenate([read_wav(p) for p in paths]), sample_rate)
        return out


def _settings(args) -> Settings:
    overrides = generation_overrides(args)
    for name in ("sampler", "decoder"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.candidates < 1:
        raise ReadError(f"--candidates must be at least 1, got {args.candidates}")
    if not 0 <= args.cvvp_amount <= 1:
        raise ReadError(f"--cvvp-amount must be in [0, 1], got {args.cvvp_amount}")
    return Settings(args.preset, args.candidates, args.cvvp_amount, overrides)


def read(args, say=print) -> int:
    """The command, from parsed arguments; raises ReadError (or ValueError from the API) on bad input."""
    import pyggml as pg

    from . import voices as vc
    from .api import PRESETS
    from .utils.text import VoiceBpeTokenizer
    from .weights.model_file import ModelFile

    if args.preset not in PRESETS:
        raise ReadError(f"unknown preset {args.preset!r}: choose from {', '.join(PRESETS)}")
    if not os.path.isfile(args.model):
        raise ReadError(f"no model file {args.model!r}: convert the checkpoints first (python -m "
                        "tortoise_ggml.convert MODELS_DIR -o tortoise.gguf) or pass --model")
    for d in args.voices_dir:
        if not os.path.isdir(d):
            raise ReadError(f"--voices-dir {d!r} is not a folder")
    settings = _settings(args)
    text = args.text if args.text is not None else read_text(args.textfile)
    if not text.strip():
        raise ReadError("the text is empty")
    regenerate = parse_regenerate(args.regenerate)

    # the model file's tokenizer, voices and sizes, without loading any weights
    light = ModelFile(args.model, pg.Backend("cpu", threads=1), components=[])
    try:
        if "autoregressive" not in light.available_components:
            raise ReadError(f"{args.model} has no autoregressive model")
        parts = plan_text(text, VoiceBpeTokenizer.from_model_file(light),
                          light.config("autoregressive").max_text_tokens, say)
        bad = [j for j in regenerate if not 0 <= j < len(parts)]
        if bad:
            raise ReadError(f"--regenerate {bad[0]} is out of range: the text has {len(parts)} parts "
                            f"(0-{len(parts) - 1})")
        rate = light.audio_config.output_sample_rate
        specs = vc.split_voices(args.voice)
        voices, runs = {}, []
        for spec in specs:
            clips, latents = vc.load_voices(spec, light, args.voices_dir)
            if settings.cvvp_amount > 0 and clips is None:
                raise ReadError(f"--cvvp-amount needs the voice's clips: {spec!r} is "
                                f"{'random' if latents is None else 'saved latents'} (use a folder of clips)")
            run = VoiceRun(spec, os.path.join(args.output_path, voice_folder(spec)), parts, args.seed,
                           _output_name(args.output_name))
            same = [r.spec for r in runs if os.path.abspath(r.folder) == os.path.abspath(run.folder)]
            if same or spec in voices:
                raise ReadError(f"voices {(same or [spec])[0]!r} and {spec!r} would share the folder {run.folder!r}")
            check_writable(run.folder)
            runs.append(run)
            voices[spec] = (clips, latents)
    finally:
        light.close()

    seed = args.seed
    jobs, todo = [], {}
    for run in runs:
        if run.seed is None:
            run.seed = seed if seed is not None else int(time.time())
        make, reused, changed = run.todo(regenerate)
        for j in changed:
            say(f"{run.spec}: the text of part {j} changed since it was made: making it again")
        say(f"{run.spec}: {len(parts)} parts in {run.folder}: {len(make)} to make"
            + (f", {len(reused)} already made" if reused else "") + f" (seed {run.seed})")
        todo[run.spec] = run
        voices[run.spec] = VoiceData(run.spec, *voices[run.spec], seed=voice_seed(run.seed))
        jobs += [Job(run.spec, j, parts[j], part_seed(run.seed, j), run.part_path(j)) for j in make]

    bar = _Bar(len(jobs), enabled=not args.quiet)

    def on_result(job: Job, wavs) -> None:
        todo[job.voice].write_part(job.index, wavs, rate)
        bar.update(len(wavs[0]) / rate)

    try:
        if args.ray:
            run_ray(jobs, voices, settings, on_result, args.ray, args.model, device=args.device,
                    threads=args.threads, workers=args.ray_workers, retries=args.ray_retries,
                    tts_options={"mel_positions": args.mel_positions})
        elif jobs:
            worker = PartWorker(args.model, device=args.device, threads=args.threads,
                                mel_positions=args.mel_positions)
            run_serial(worker, jobs, voices, settings, on_result, verbose=args.verbose)
    finally:
        bar.close()
    for run in runs:
        out = run.combine(rate)
        if out is not None:
            say(f"wrote {out}")
    return 0


def _output_name(name: str) -> str:
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise ReadError(f"--output_name must be a file name, got {name!r}")
    return name if os.path.splitext(name)[1] else name + ".wav"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tortoise_ggml.read", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("TORTOISE_GGML_MODEL", "tortoise.gguf"),
                    help="GGUF from python -m tortoise_ggml.convert (default: $TORTOISE_GGML_MODEL or tortoise.gguf)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--textfile", help="file with the text to read")
    src.add_argument("--text", help="the text itself")
    ap.add_argument("--voice", default="random",
                    help="voice(s): a folder of clips, a stored or --voices-dir name, a .npz/.pth latents file or "
                    "'random'; comma-separated: one run per voice; 'a&b': one voice mixed from a and b")
    ap.add_argument("--voices-dir", "--voices_dir", action="append", default=[], dest="voices_dir",
                    help="a folder of voice folders (tortoise's extra_voice_dirs); may repeat")
    ap.add_argument("--output_path", "--output-path", dest="output_path", default="results/longform/",
                    help="where each voice's folder goes (default results/longform/)")
    ap.add_argument("--output_name", "--output-name", dest="output_name", default="combined.wav",
                    help="the combined file's name in each voice's folder (default combined.wav)")
    from .api import PRESETS
    ap.add_argument("--preset", default="standard", help=f"{', '.join(PRESETS)} (default standard)")
    ap.add_argument("--sampler", default=None, help="diffusion sampler (default: the preset's)")
    ap.add_argument("--decoder", default=None, help="audio decoder, where TextToSpeech.tts offers a choice")
    ap.add_argument("--regenerate", default=None, help="comma-separated part numbers to make again")
    ap.add_argument("--candidates", type=int, default=1,
                    help="candidates per part: the best is the part, the others go to PART/1.wav ...")
    ap.add_argument("--seed", type=int, default=None,
                    help="random seed (default: the one a resumed folder used, else the time)")
    ap.add_argument("--cvvp-amount", "--cvvp_amount", type=float, default=0.0, dest="cvvp_amount",
                    help="weight of CVVP against CLVP when picking candidates, 0..1 (needs clip voices)")
    add_generation_options(ap)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per model (default: all; with --ray, per worker: 4)")
    ap.add_argument("--ray", default=None, metavar="ADDRESS",
                    help="speak the parts on Ray workers: 'local' (start Ray here), 'auto' (the cluster this "
                    "machine belongs to), HOST:6379 or ray://HOST:10001 (the model path must exist on every node)")
    ap.add_argument("--ray-workers", type=int, default=None,
                    help="Ray workers (default: the cluster's CPUs / --threads)")
    ap.add_argument("--ray-retries", type=int, default=2, help="times a failed part is retried (default 2)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show each stage's progress too")
    ap.add_argument("-q", "--quiet", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    try:
        return read(args, say)
    except user_errors() as e:
        return fail(describe(e))
    except KeyboardInterrupt:
        print("error: interrupted (the parts written so far are kept: run the same command to resume)",
              file=sys.stderr)
        return 130


__all__ = ["ReadError", "read_text", "split_text", "fit_parts", "plan_text", "derive_seed", "part_seed",
           "voice_seed", "speak_parts", "PartWorker", "run_ray", "run_serial", "main"]

if __name__ == "__main__":
    sys.exit(main())
