"""HiFi-GAN decoder (tortoise_ggml/models/hifigan_decoder.py) and api_fast's paths (tts(decoder="hifigan"),
tts_stream) against tortoise-tts 3.0.0's HifiganGenerator and handle_chunks on the same random weights.

Small config (tests/reference/oracle.py): api_fast's architecture (upsample factors 8, 8, 2, 2 with kernels 16, 16,
4, 4; ResBlock1 with kernels 3, 7, 11 and dilations 1, 3, 5) at 128 input/conditioning channels and 256 initial
channels (256 -> 128 -> 64 -> 32 -> 16: every level a multiple of the fused kernel's 16 lanes).

Tolerances:
* interpolation: bit-identical to torch's F.interpolate here (its AVX kernels use fused multiply-adds, which
  interpolate_linear reproduces); asserted within 1 ulp, for a torch built without them.
* decoder: both sides float32, ours with other summation orders (fused kernel or mul_mat over windows instead of
  oneDNN convolutions). Measured max abs error 4e-8 on outputs of peak 0.1 (4e-7 relative), through 4 levels of
  3 ResBlocks of 6 convolutions. Asserted: 1e-5 of the output's peak, while a wrong tap, dilation, channel, the
  conditioning left out or a slope mixed up moves it by more than 1e-2 of the peak (checked for the conditioning).
* windowed decoding (``decode``, the stream's decodes) against one whole-signal pass: the same arithmetic on the
  same inputs away from the window edges, measured bit-identical; asserted to 1e-6 of the peak.
* stream vs one-shot: greedy codes identical; latents from the KV-cache decode steps vs the teacher-forced pass
  within 1e-4 (measured ~1e-6: the same GPT-2 through other graphs); stream chunks vs tortoise's handle_chunks of
  the reference decoder's whole decodes at the same points within 1e-5 of the peak.
"""
import gc
import os
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest

import pyggml as pg
from tortoise_ggml import kernels
from tortoise_ggml.models.hifigan_decoder import (
    HifiganGenerator,
    interpolate_linear,
    transform_for,
    upsample_latents,
    upsampled_frames,
)
from tortoise_ggml.weights import registry

COMPONENTS = ["autoregressive", "rlg_auto", "hifigan"]  # what the shared model_file fixture loads
REFERENCE = "hifigan"  # the component whose tortoise-tts model the shared reference fixture loads
TEXT = "Hello there."
FUSABLE = kernels.usable(pg.Backend("cpu", threads=1), 16)


@pytest.fixture(scope="module")
def hifi(model_file):
    return HifiganGenerator(model_file)


@pytest.fixture(scope="module")
def tts(small_gguf):
    from tortoise_ggml.api import TextToSpeech
    return TextToSpeech(small_gguf, threads=2, components=COMPONENTS)


@pytest.fixture(scope="module")
def gguf_without_hifigan(small_ckpt_dir, tmp_path_factory):
    """The small checkpoints without hifidecoder.pth, converted with the default component list."""
    from tortoise_ggml.convert import convert
    d = tmp_path_factory.mktemp("ckpt_no_hifigan")
    for f in os.listdir(small_ckpt_dir):
        if f != "hifidecoder.pth":
            os.symlink(os.path.join(small_ckpt_dir, f), d / f)
    return convert(d, tmp_path_factory.mktemp("gguf_no_hifigan") / "no-hifigan.gguf")


def _latents(seed, n, dim=128):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, n, dim)).astype(np.float32), rng.standard_normal((1, dim)).astype(np.float32)


def _reference(oracle, reference, latents, voice):
    import torch
    return oracle.hifigan_inference(reference, torch.from_numpy(latents), torch.from_numpy(voice)).numpy()


# ------------------------------------------------------------------------------------------------------------------
# the interpolation
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 11, 12, 17, 60, 233])
def test_interpolation_is_torchs(oracle, n):
    import torch
    x = torch.randn(2, 8, n, generator=torch.Generator().manual_seed(n)) * 3
    for scale in (1024 / 256, 24000 / 22050):
        want = torch.nn.functional.interpolate(x, scale_factor=[scale], mode="linear").numpy()
        got = interpolate_linear(x.numpy(), scale, axis=-1)
        assert got.shape == want.shape
        np.testing.assert_array_max_ulp(got, want, maxulp=1)
        assert (got == want).mean() > 0.99
    lat = x.numpy().transpose(0, 2, 1)                                      # (B, T, D), as the latents come
    up = torch.nn.functional.interpolate(torch.nn.functional.interpolate(x, scale_factor=[4.0], mode="linear"),
                                         scale_factor=[24000 / 22050], mode="linear").numpy().transpose(0, 2, 1)
    got = upsample_latents(lat)
    assert got.shape == up.shape and got.shape[1] == upsampled_frames(n)
    np.testing.assert_array_max_ulp(got, up, maxulp=1)


# ------------------------------------------------------------------------------------------------------------------
# the checkpoint schema and the converter
# ------------------------------------------------------------------------------------------------------------------
def _meta_shapes(oracle, cfg):
    import torch

    from tortoise_ggml.weights import checkpoints
    with torch.device("meta"):
        m = oracle.construct_hifigan(cfg)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    for base, (g, v) in checkpoints.weight_norm_pairs(shapes, "meta").items():
        shapes[base] = shapes.pop(v)
        del shapes[g]
    return shapes


@pytest.mark.parametrize("cfg", [
    "full",
    "small",
    dict(in_channels=32, out_channels=1, resblock_type="2", resblock_dilation_sizes=[[1, 3], [2, 4]],
         resblock_kernel_sizes=[3, 5], upsample_kernel_sizes=[8, 4], upsample_initial_channel=64,
         upsample_factors=[4, 2], cond_channels=0, conv_post_bias=False),
])
def test_schema_is_the_reference_state_dict(oracle, cfg):
    comp = registry.component("hifigan")
    if isinstance(cfg, str):
        size, cfg = cfg, oracle.CONFIGS[cfg]["hifigan"]
    else:
        size = None
    shapes = _meta_shapes(oracle, cfg)
    # api_fast's config needs no config.json: its factors follow from the kernels (k = 2u), dilations default
    config = {} if size == "full" else {"resblock_dilation_sizes": cfg["resblock_dilation_sizes"],
                                        "upsample_factors": cfg["upsample_factors"]}
    hp, ignored = comp.validate(shapes, "meta", config)
    assert not ignored
    for k, v in cfg.items():
        if k == "resblock_dilation_sizes":
            per = 3 if cfg["resblock_type"] == "1" else 2
            assert hp["resblock_dilations"] == [x for d in v for x in d[:per]]
        elif k in hp:
            assert hp[k] == v, k
    # an XTTS HifiDecoder's speaker encoder beside the generator is ignored, as tortoise's strict=False load does
    extra = dict(shapes, **{"speaker_encoder.conv1.weight": (32, 1, 3)})
    assert list(comp.validate(extra, "meta", config)[1]) == ["speaker_encoder.conv1.weight"]
    # anything else unknown is an error, not silently random weights as in tortoise
    from tortoise_ggml.weights.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="unknown key 'waveform_decoder.conv_pre.weight'"):
        comp.validate(dict(shapes, **{"waveform_decoder.conv_pre.weight": (1, 1, 7)}), "meta", config)


def test_other_architecture_converts_and_matches(oracle, tmp_path, backend):
    """A ResBlock2, unconditioned HiFi-GAN without conv_post bias, with other factors: config.json gives the
    dilations and factors, the shapes the rest."""
    import json

    import torch

    from tortoise_ggml.convert import convert
    from tortoise_ggml.weights.model_file import ModelFile
    cfg = dict(in_channels=32, out_channels=1, resblock_type="2", resblock_dilation_sizes=[[1, 3], [2, 4]],
               resblock_kernel_sizes=[3, 5], upsample_kernel_sizes=[8, 4], upsample_initial_channel=64,
               upsample_factors=[4, 2], cond_channels=0, conv_post_bias=False)
    torch.manual_seed(3)
    m = oracle.construct_hifigan(cfg)
    torch.save(m.state_dict(), tmp_path / "hifidecoder.pth")
    (tmp_path / "config.json").write_text(json.dumps({"configs": {"hifigan": cfg}}))
    path = convert(tmp_path, tmp_path / "h.gguf", components="hifigan")
    x = np.random.default_rng(0).standard_normal((2, 32, 23)).astype(np.float32)
    with torch.no_grad():
        want = m.forward(torch.from_numpy(x)).numpy()
    with ModelFile(path, backend) as mf:
        ours = HifiganGenerator(mf)
        assert ours.hop_length == 8 and ours.cond_layer is None
        got = ours.forward(x)
        with pytest.raises(ValueError, match="no cond_layer"):
            ours.forward(x, np.zeros((2, 4, 1), np.float32))
    assert got.shape == want.shape == (2, 1, 23 * 8)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_default_conversion_without_hifidecoder(gguf_without_hifigan, small_ckpt_dir, tmp_path):
    """A models folder without hifidecoder.pth converts as before (hifigan is optional); asked for, it is missing."""
    from tortoise_ggml.convert import convert
    from tortoise_ggml.weights.model_file import ModelFile
    with ModelFile(gguf_without_hifigan, pg.Backend("cpu", threads=1), components=["rlg_auto"]) as mf:
        assert mf.available_components == list(registry.REQUIRED_COMPONENTS)
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(os.path.join(small_ckpt_dir, "rlg_auto.pth"), d)
    with pytest.raises(FileNotFoundError, match="hifidecoder.pth"):
        convert(d, tmp_path / "o.gguf", components="hifigan")


def test_fast_path_without_the_component_says_how_to_add_it(gguf_without_hifigan):
    from tortoise_ggml.api import MissingComponent, TextToSpeech
    tts = TextToSpeech(gguf_without_hifigan, threads=1, components=["autoregressive", "rlg_auto"])
    for call in (lambda: tts.tts(TEXT, decoder="hifigan"), lambda: tts.tts_stream(TEXT)):
        with pytest.raises(MissingComponent, match=r"has no hifigan component .*hifidecoder\.pth.*"
                                                   r"python -m tortoise_ggml\.convert"):
            call()
    with pytest.raises(ValueError, match="unknown decoder 'bigvgan'"):
        tts.tts(TEXT, decoder="bigvgan")


# ------------------------------------------------------------------------------------------------------------------
# the decoder
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused,spectral", [
    pytest.param(True, True, marks=pytest.mark.skipif(not FUSABLE, reason="tortoise_ggml.kernels not built")),
    pytest.param(True, False, marks=pytest.mark.skipif(not FUSABLE, reason="tortoise_ggml.kernels not built")),
    (False, True)], ids=["spectral", "fused-direct", "ggml"])
def test_inference_matches_reference(oracle, model_file, reference, fused, spectral):
    ours = HifiganGenerator(model_file, fused=fused, spectral=spectral)
    assert ours.fused == fused
    # the 7- and 11-tap residual-block convolutions by FFT blocks, the 3-tap ones of 64+ channels by Winograd, the
    # rest direct (only where fused)
    convs = [c for b in ours.resblocks for c in b.convs]
    want = [transform_for(c.in_channels, c.out_channels, c.kernel_size) if fused and spectral else None
            for c in convs]
    assert [c.transform for c in convs] == want
    assert set(want) == ({"spectral", "winograd", None} if fused and spectral else {None})
    latents, voice = _latents(0, 9)
    want = _reference(oracle, reference, latents, voice)
    got = ours.inference(latents, voice)
    assert got.shape == want.shape == (1, 1, 256 * upsampled_frames(9))
    peak = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * peak
    # the conditioning matters far beyond the tolerance (cond_layer is wired in)
    other = ours.inference(latents, -voice)
    assert np.abs(other - got).max() > 1e-2 * peak


def test_batch_forward_matches_reference(model_file, reference, hifi):
    import torch
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 128, 14)).astype(np.float32)
    g = rng.standard_normal((2, 128, 1)).astype(np.float32)
    with torch.no_grad():
        want = reference.forward(torch.from_numpy(x), torch.from_numpy(g)).numpy()
    got = hifi.forward(x, g)
    assert got.shape == want.shape == (2, 1, 14 * 256)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_windows_equal_the_whole_signal(hifi):
    latents, voice = _latents(2, 30)
    frames = upsample_latents(latents)
    n = frames.shape[1]
    whole = hifi.decode(frames, voice, max_frames=n)
    peak = np.abs(whole).max()
    for max_frames in (20, 64):
        assert np.abs(hifi.decode(frames, voice, max_frames=max_frames) - whole).max() <= 1e-6 * peak
    for start, stop in ((0, 5), (50, 90), (n - 3, n)):
        part = hifi.decode(frames, voice, start, stop)
        assert np.abs(part - whole[:, start * 256:stop * 256]).max() <= 1e-6 * peak
    # frames beyond the receptive field do not matter at all
    ctx = hifi.receptive_field()
    changed = frames.copy()
    changed[:, :40 - ctx] += 5
    changed[:, 60 + ctx:] -= 5
    assert np.array_equal(hifi.decode(changed, voice, 40, 60), hifi.decode(frames, voice, 40, 60))


def test_bad_inputs(hifi):
    latents, voice = _latents(3, 4)
    with pytest.raises(ValueError, match=r"latents must be \(batch, frames, 128\)"):
        hifi.inference(latents[..., :64], voice)
    with pytest.raises(ValueError, match="voice latent"):
        hifi.inference(latents, voice[:, :5])
    with pytest.raises(ValueError, match="conditioned on a voice latent"):
        hifi.inference(latents)
    with pytest.raises(ValueError, match="NaN"):
        hifi.inference(np.full_like(latents, np.nan), voice)
    with pytest.raises(ValueError, match="start"):
        hifi.decode(upsample_latents(latents), voice, 5, 3)


# ------------------------------------------------------------------------------------------------------------------
# the pipeline: tts(decoder="hifigan") and tts_stream
# ------------------------------------------------------------------------------------------------------------------
MAX_CODES = 100  # the small random AR never stops by itself: 100 codes, ~4.6 s of audio
CHUNK = 20


def _reference_stream(oracle, reference, latents, voice, chunk, overlap):
    """api_fast's tts_stream loop on given latents: decode all latents so far at 60, 60 + chunk, ... and at the
    end with the reference decoder, joined by its handle_chunks."""
    import torch
    n = latents.shape[0]
    points = []
    pending, first = 0, 60
    for i in range(1, n + 1):
        pending += 1
        if pending >= max(chunk, first):
            points.append(i)
            pending, first = 0, 0
    points.append(n)  # the StopIteration decode (the reference decodes again even with no new latents)
    prev = over = None
    chunks = []
    for i, p in enumerate(points):
        if i == len(points) - 1 and i > 0 and points[i - 1] == n:
            break  # no new latents: the reference would crash here (an empty crossfade); ours yields nothing
        wav = torch.from_numpy(_reference(oracle, reference, latents[None, :p], voice)).squeeze()
        c, prev, over = oracle.handle_chunks(wav, prev, over, overlap)
        chunks.append(c.numpy().copy())
    return chunks


def test_stream_matches_one_shot_and_reference(oracle, tts, reference):
    ar = tts.autoregressive
    voice = tts.rlg_auto.sample(np.random.default_rng(5), 1)
    stream = tts.tts_stream(TEXT, conditioning_latents=voice, top_k=1, max_mel_tokens=MAX_CODES,
                            stream_chunk_size=CHUNK, seed=0)
    chunks = list(stream)
    codes, latents = np.array(stream.codes), stream.latents
    # greedy: the same codes as the one-shot path's sampling, the same latents as its teacher-forced pass
    text = np.pad(np.asarray(tts.tokenizer.encode(TEXT), np.int32)[None], ((0, 0), (0, 1)))
    one_codes = ar.inference_speech(voice, text, max_generate_length=MAX_CODES, top_k=1, repetition_penalty=2.0,
                                    rng=0)
    assert np.array_equal(codes, one_codes[0])
    one_latents = ar.forward(voice, text, [text.shape[1]], one_codes, [one_codes.shape[1] * 1024],
                             return_latent=True, clip_inputs=False)[0]
    assert latents.shape == one_latents.shape == (len(codes), 128)
    assert np.abs(latents - one_latents).max() <= 1e-4 * np.abs(one_latents).max()
    # the one-shot fast path decodes those latents
    wav = tts.tts(TEXT, conditioning_latents=(voice, None), decoder="hifigan", top_k=1, max_mel_tokens=MAX_CODES,
                  seed=0, verbose=False)
    assert wav.shape == (1, 256 * upsampled_frames(len(codes)))
    # chunks: 60 codes first, then every CHUNK, each crossfaded as tortoise's handle_chunks does
    want = _reference_stream(oracle, reference, latents, voice, CHUNK, 1024)
    assert [c.shape for c in chunks] == [c.shape for c in want]
    got, ref = np.concatenate(chunks), np.concatenate(want)
    peak = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-5 * peak
    # the stream is the one-shot audio except in the crossfades (and the held-back tail)
    assert got.shape[0] == wav.shape[1] - 1024
    assert np.abs(got[:60_000] - wav[0, :60_000]).max() <= 1e-4 * peak
    assert stream.stats["first_chunk_s"] > 0 and stream.stats["audio_s"] == pytest.approx(got.shape[0] / 24000)


def test_sampled_stream_codes_are_the_one_shot_codes(tts):
    """With sampling too: one numpy Generator feeds both, step by step."""
    voice = tts.rlg_auto.sample(np.random.default_rng(6), 1)
    stream = tts.tts_stream(TEXT, conditioning_latents=voice, max_mel_tokens=70, seed=11)
    for _ in stream:
        pass
    text = np.pad(np.asarray(tts.tokenizer.encode(TEXT), np.int32)[None], ((0, 0), (0, 1)))
    one = tts.autoregressive.inference_speech(voice, text, max_generate_length=70, top_k=50, top_p=.8,
                                              temperature=.8, repetition_penalty=2.0, rng=11)
    assert stream.codes == one[0].tolist()


def test_stream_bad_arguments(tts):
    for kw, match in ((dict(stream_chunk_size=0), "stream_chunk_size must be an integer >= 1"),
                      (dict(stream_chunk_size=-3), "stream_chunk_size"),
                      (dict(stream_chunk_size=2.5), "stream_chunk_size"),
                      (dict(overlap_wav_len=-1), "overlap_wav_len must be an integer >= 0"),
                      (dict(stream_chunk_size=2, overlap_wav_len=4096), "longer than a chunk"),
                      (dict(max_mel_tokens=0), "max_mel_tokens"),
                      (dict(first_buffer=0), "first_buffer must be an integer >= 1"),
                      (dict(conditioning_latents=np.zeros(7, np.float32)), "conditioning latent")):
        with pytest.raises(ValueError, match=match):
            tts.tts_stream(TEXT, **kw)
    with pytest.raises(ValueError, match="too much text"):
        tts.tts_stream("word " * 2000)
    with pytest.raises(ValueError, match="k must be 1"):
        tts.tts(TEXT, decoder="hifigan", k=2)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_abandoned_streams_free_everything(tts):
    im = tts.autoregressive.inference_model

    def abandon(chunks):
        s = tts.tts_stream(TEXT, max_mel_tokens=MAX_CODES, stream_chunk_size=5, first_buffer=5, seed=1)
        for _ in range(chunks):
            next(s)
        assert im.cache is not None or chunks == 0
        # dropped mid-stream: no gc.collect() needed (no reference cycle), the KV cache goes at once

    abandon(1)
    gc.collect()
    before = _rss_mb()
    for i in range(20):
        abandon(i % 2)
        assert im.cache is None
    gc.collect()
    assert _rss_mb() - before < 30  # MB: no cache, graph or buffer kept per stream


def test_first_buffer_gives_the_first_audio_sooner(tts):
    s = tts.tts_stream(TEXT, max_mel_tokens=30, stream_chunk_size=10, first_buffer=10, seed=1)
    first = next(s)
    assert len(s.codes) == 10 and first.shape == (256 * upsampled_frames(10) - 1024,)
    rest = list(s)
    assert sum(c.shape[0] for c in [first, *rest]) == 256 * upsampled_frames(30) - 1024


def test_paused_stream_raises_when_another_call_takes_the_cache(tts):
    s = tts.tts_stream(TEXT, max_mel_tokens=MAX_CODES, stream_chunk_size=CHUNK, seed=1)
    next(s)
    tts.tts(TEXT, decoder="hifigan", max_mel_tokens=5, seed=0, verbose=False)
    with pytest.raises(RuntimeError, match="another generation started"):
        for _ in s:
            pass


# ------------------------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------------------------
def test_cli_streams_a_valid_wav_and_raw_pcm(small_gguf, tmp_path):
    from tortoise_ggml.generate import WavStreamWriter, main
    from tortoise_ggml.utils.audio import to_pcm16 as pcm16
    out = tmp_path / "s.wav"
    args = ["--model", str(small_gguf), "--text", TEXT, "--decoder", "hifigan", "--stream", "--max-mel-tokens", "70",
            "--stream-chunk-size", "5", "--seed", "0", "--threads", "2"]
    assert main(args + ["-o", str(out)]) == 0
    with wave.open(str(out)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        n = w.getnframes()
        assert n == 256 * upsampled_frames(70) - 1024
    # the writer's file is complete after every chunk
    part = tmp_path / "p.wav"
    writer = WavStreamWriter(str(part), 24000)
    for k in range(3):
        writer.write(pcm16(np.full(100, 0.5, np.float32)))
        with wave.open(str(part)) as w:
            assert w.getnframes() == 100 * (k + 1)
    writer.close()
    # -o -: raw PCM on stdout, the progress on stderr
    p = subprocess.run([sys.executable, "-m", "tortoise_ggml.generate", *args, "-o", "-"], capture_output=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert len(p.stdout) == 2 * n
    with wave.open(str(out)) as w:
        assert p.stdout == w.readframes(n)
    assert b"RTF" in p.stderr and b"first audio after" in p.stderr
    assert main(["--model", str(small_gguf), "--stream", "--decoder", "univnet", "-o", str(out)]) == 2
