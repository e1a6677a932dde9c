"""python -m tortoise_ggml.read (tortoise's read.py) and generate's long texts, on the small random model."""
import os

import numpy as np
import pytest
import soundfile

from tortoise_ggml import read as rd
from tortoise_ggml.generate import main as generate
from tortoise_ggml.read import main as read

TINY = ["--preset", "ultra_fast", "--num-autoregressive-samples", "1", "--diffusion-iterations", "2",
        "--max-mel-tokens", "8", "--threads", "2", "-q"]
STORY = "The tortoise woke up. | It walked to the river. | There it drank, slowly."


def _read(small_gguf, out, *extra, text=STORY):
    return read(["--model", str(small_gguf), "--text", text, "--output_path", str(out), "--seed", "5",
                 *TINY, *extra])


def _wav(path):
    return soundfile.read(str(path), dtype="float32")[0]


@pytest.fixture(scope="module")
def made(small_gguf, tmp_path_factory):
    """A finished read of STORY (seed 5): tests copy it."""
    out = tmp_path_factory.mktemp("read")
    assert _read(small_gguf, out) == 0
    return out


def _copy(made, tmp_path):
    import shutil
    shutil.copytree(made, tmp_path, dirs_exist_ok=True)
    return tmp_path


# -- splitting -------------------------------------------------------------------------------------------------------
def test_split_on_bars_skips_empty_pieces():
    said = []
    assert rd.split_text("One. | Two. || | Three.", said.append) == ["One.", "Two.", "Three."]
    assert any("empty: skipped" in s for s in said) and any("'|'" in s for s in said)


def test_split_without_bars_is_tortoises():
    from tortoise_ggml.utils.text import split_and_recombine_text
    text = " ".join(f"Sentence number {i} is here, and it goes on for a while." for i in range(20))
    parts = rd.split_text(text)
    assert parts == split_and_recombine_text(text, 200, 300) and len(parts) > 2
    assert all(len(p) <= 300 for p in parts)


def test_parts_too_long_are_split_further_or_named():
    said = []
    n_tokens = len                                            # one token per character, limit 120
    long = "Alpha beta gamma delta. " * 8                     # 192 characters, one manual part
    parts = rd.fit_parts(["Short.", long.strip()], n_tokens, 120, said.append)
    assert parts[0] == "Short." and len(parts) > 2 and all(len(p) <= 120 for p in parts)
    assert "part 1" in said[0] and "split into" in said[0]
    with pytest.raises(rd.ReadError, match=r"part 1 \('XX.*limit is 10"):
        rd.fit_parts(["ok", "XX" * 40], lambda t: 11 if "X" in t else 1, 10)


def test_part_seeds_depend_on_seed_and_index():
    assert rd.part_seed(5, 0) == rd.part_seed(5, 0)
    assert len({rd.part_seed(5, j) for j in range(50)} | {rd.part_seed(6, 0)}) == 51
    assert rd.part_seed(-1, 0) >= 0 and rd.voice_seed(5) != rd.part_seed(5, 0)


# -- the command ---------------------------------------------------------------------------------------------------
def test_read_writes_parts_then_combined_and_resumes(small_gguf, made, tmp_path, capsys):
    folder = _copy(made, tmp_path) / "random"
    assert sorted(os.listdir(folder)) == ["0.wav", "1.wav", "2.wav", "combined.wav", "parts.json"]
    parts = [_wav(folder / f"{j}.wav") for j in range(3)]
    np.testing.assert_array_equal(_wav(folder / "combined.wav"), np.concatenate(parts))
    assert len({p.tobytes() for p in parts}) == 3               # each part its own seed
    stamps = {j: os.stat(folder / f"{j}.wav").st_mtime_ns for j in range(3)}

    # resume: nothing to make; --regenerate 1 makes part 1 only, the same audio for the same seed
    os.remove(folder / "combined.wav")
    assert read(["--model", str(small_gguf), "--text", STORY, "--output_path", str(tmp_path), *TINY]) == 0
    assert {j: os.stat(folder / f"{j}.wav").st_mtime_ns for j in range(3)} == stamps
    np.testing.assert_array_equal(_wav(folder / "combined.wav"), np.concatenate(parts))
    assert _read(small_gguf, tmp_path, "--regenerate", "1") == 0
    now = {j: os.stat(folder / f"{j}.wav").st_mtime_ns for j in range(3)}
    assert now[0] == stamps[0] and now[2] == stamps[2] and now[1] != stamps[1]
    np.testing.assert_array_equal(_wav(folder / "1.wav"), parts[1])

    # a part whose text changed is made again, the others are kept
    changed = STORY.replace("river", "sea")
    read(["--model", str(small_gguf), "--text", changed, "--output_path", str(tmp_path), *TINY[:-1]])
    assert "part 1 changed" in capsys.readouterr().err
    assert os.stat(folder / "0.wav").st_mtime_ns == stamps[0]
    assert not np.array_equal(_wav(folder / "1.wav"), parts[1])


def test_read_candidates_and_voices(small_gguf, tmp_path):
    voices = tmp_path / "voices"
    (voices / "me").mkdir(parents=True)
    rng = np.random.default_rng(0)
    soundfile.write(str(voices / "me" / "a.wav"), (0.1 * rng.standard_normal(30000)).astype(np.float32), 22050)
    out = tmp_path / "out"
    assert _read(small_gguf, out, "--voice", "me,random", "--voices-dir", str(voices), "--candidates", "2",
                 "--num-autoregressive-samples", "2", "--output_name", "all", text="Hello there. | Goodbye.") == 0
    for v in ("me", "random"):
        assert sorted(os.listdir(out / v)) == ["0", "0.wav", "1", "1.wav", "all.wav", "parts.json"]
        assert os.listdir(out / v / "0") == ["1.wav"]
    assert not np.array_equal(_wav(out / "me" / "0.wav"), _wav(out / "random" / "0.wav"))


@pytest.mark.parametrize("extra, message", [
    (["--regenerate", "3"], "--regenerate 3 is out of range: the text has 3 parts"),
    (["--regenerate", "x"], "--regenerate takes comma-separated part numbers"),
    (["--voice", "nobody"], "unknown voice 'nobody'"),
    (["--preset", "warp"], "unknown preset 'warp'"),
    (["--cvvp-amount", "0.5"], "--cvvp-amount needs the voice's clips: 'random'"),
    (["--output_name", "a/b.wav"], "--output_name must be a file name"),
])
def test_read_bad_input_is_one_error_line(small_gguf, tmp_path, capsys, extra, message):
    assert _read(small_gguf, tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and "Traceback" not in err


def test_read_errors_lose_nothing(small_gguf, made, tmp_path, capsys):
    _copy(made, tmp_path)
    before = {f: (tmp_path / "random" / f).read_bytes() for f in os.listdir(tmp_path / "random")}
    for extra in (["--regenerate", "0,9"], ["--voice", "random,nobody"]):
        assert _read(small_gguf, tmp_path, *extra) == 2
    assert {f: (tmp_path / "random" / f).read_bytes() for f in os.listdir(tmp_path / "random")} == before
    # an output folder that cannot be made is found before any synthesis
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _read(small_gguf, blocker / "sub") == 2
    assert "cannot write to output folder" in capsys.readouterr().err
    empty = tmp_path / "voices" / "silent"
    empty.mkdir(parents=True)
    assert _read(small_gguf, tmp_path / "o", "--voice", str(empty)) == 2
    assert "holds no audio clips" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert read(["--model", str(small_gguf), "--text", " | | ", "--output_path", str(tmp_path / "o"), *TINY]) == 2
    assert "no text to read" in capsys.readouterr().err


def test_read_textfile_joins_lines(small_gguf, tmp_path):
    f = tmp_path / "story.txt"
    f.write_text("The tortoise\nwoke up.\n")
    assert read(["--model", str(small_gguf), "--textfile", str(f), "--output_path", str(tmp_path), "--seed", "1",
                 *TINY]) == 0
    import json
    assert json.loads((tmp_path / "random" / "parts.json").read_text())["texts"] == ["The tortoise woke up."]


# -- generate with long text ---------------------------------------------------------------------------------------
def test_generate_splits_long_text_into_one_file(small_gguf, tmp_path):
    text = "Sentence number one is here. " * 52                    # ~1500 characters
    out = tmp_path / "long.wav"
    assert generate(["--model", str(small_gguf), "--text", text, "--num-autoregressive-samples", "1",
                     "--diffusion-iterations", "2", "--max-mel-tokens", "6", "--seed", "2", "--threads", "2",
                     "-o", str(out), "-q"]) == 0
    from tortoise_ggml.api import TextToSpeech
    tts = TextToSpeech(str(small_gguf), threads=1, components=["autoregressive"])
    assert len(tts.tokenizer.encode(text)) > tts.autoregressive.config.max_text_tokens    # tts() alone refuses it
    n_parts = len(rd.split_text(text))
    assert n_parts > 4
    assert soundfile.info(str(out)).frames >= n_parts * 256


def test_interrupted_run_resumes(small_gguf, made, tmp_path, monkeypatch, capsys):
    """An interruption keeps the parts written so far (each written whole) and no combined file; the same command
    then makes only what is missing, including a changed part the interruption cut off."""
    folder = _copy(made, tmp_path) / "random"
    old = {j: (folder / f"{j}.wav").read_bytes() for j in range(3)}
    real = rd.PartWorker.synthesize

    def interrupted(self, job, *a, **kw):
        if job.index == 2:
            raise KeyboardInterrupt
        return real(self, job, *a, **kw)

    monkeypatch.setattr(rd.PartWorker, "synthesize", interrupted)
    changed = STORY.replace("river", "sea").replace("slowly", "fast")        # parts 1 and 2 change
    os.remove(folder / "combined.wav")
    assert _read(small_gguf, tmp_path, text=changed) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(f for f in os.listdir(folder) if not f.endswith(".json")) == ["0.wav", "1.wav", "2.wav"]
    assert (folder / "0.wav").read_bytes() == old[0] and (folder / "1.wav").read_bytes() != old[1]
    assert (folder / "2.wav").read_bytes() == old[2]               # not made yet: kept, but known to be stale
    monkeypatch.setattr(rd.PartWorker, "synthesize", real)
    stamp1 = os.stat(folder / "1.wav").st_mtime_ns
    assert _read(small_gguf, tmp_path, text=changed) == 0
    assert os.stat(folder / "1.wav").st_mtime_ns == stamp1 and (folder / "2.wav").read_bytes() != old[2]
    assert (folder / "combined.wav").exists()
