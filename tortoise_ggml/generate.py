"""Command line: text -> speech, or mel -> wav.

    python -m tortoise_ggml.generate --model tortoise.gguf --text "Hello." --voice voices/me -o hello.wav
    python -m tortoise_ggml.generate --model tortoise.gguf --mel mel.npy -o out.wav      # vocoder only
    python -m tortoise_ggml.generate --model tortoise.gguf --decoder hifigan --stream -o - | aplay -f S16_LE -r 24000

With no --text the embedded default sentence is spoken; with no --voice a random voice is drawn. A voice is a
directory of clips (wav/mp3/flac, any rate), a name stored in the model file (convert --voices), or "random".
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

from .cli import UsageError, add_generation_options, check_output, describe, fail, generation_overrides, user_errors
from .utils.audio import to_pcm16, wav_header

DEFAULT_TEXT = "Tortoise is a text to speech program built with priorities on multi-voice capabilities and realism."


def load_voice(tts, voice: str | None, seed, extra_voice_dirs=()):
    """Conditioning latents for --voice: random, a directory of clips, a name stored in the model file or found
    under ``extra_voice_dirs`` (--voices-dir), a .npz/.pth latents file, or "a&b" mixing voices as tortoise's
    load_voices (tortoise_ggml.voices). Clips are cropped, and a random voice drawn, with ``seed``."""
    from .voices import conditioning_latents
    return conditioning_latents(tts, voice or "random", extra_voice_dirs, seed=seed)


def voice_arguments(tts, args, seed) -> dict:
    """tts() voice arguments for --voice: conditioning latents, or (CVVP needs them) the voice's clips."""
    if not getattr(args, "cvvp_amount", 0):
        return {"conditioning_latents": load_voice(tts, args.voice, seed, getattr(args, "voices_dir", ()))}
    if getattr(args, "stream", False) or getattr(args, "decoder", None) == "hifigan":
        raise UsageError("--cvvp-amount ranks the candidates of tortoise's UnivNet path: not with HiFi-GAN")
    from .voices import load_voices
    clips, latents = load_voices(args.voice or "random", tts, args.voices_dir)
    if clips is None:
        raise UsageError(f"--cvvp-amount needs the voice's clips: {args.voice or 'random'!r} is "
                         f"{'random' if latents is None else 'saved latents'} (use a folder of clips)")
    return {"voice_samples": clips, "cvvp_amount": args.cvvp_amount}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tortoise_ggml.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("TORTOISE_GGML_MODEL", "tortoise.gguf"),
                    help="GGUF from python -m tortoise_ggml.convert (default: $TORTOISE_GGML_MODEL or tortoise.gguf)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to speak (default: an embedded sentence)")
    src.add_argument("--textfile", help="file with the text to speak")
    src.add_argument("--mel", help="vocode this mel spectrogram (.npy, (n_mels, T) or (1, n_mels, T)) instead")
    ap.add_argument("--voice", default=None, help="clips directory, stored or --voices-dir voice name, .npz/.pth "
                    "latents file, 'a&b' (a mix), or 'random' (default)")
    ap.add_argument("--voices-dir", action="append", default=[], help="a folder of voice folders (may repeat)")
    ap.add_argument("--cvvp-amount", type=float, default=0.0,
                    help="weight of CVVP against CLVP when picking candidates, 0..1 (needs a voice of clips)")
    from .api import PRESETS
    from .utils.diffusion import SAMPLERS
    ap.add_argument("--preset", default="fast", choices=list(PRESETS))
    ap.add_argument("--sampler", default=None, choices=SAMPLERS,
                    help="diffusion sampler, as tortoise-tts-fast's --sampler (default: the preset's, else p)")
    ap.add_argument("--candidates", type=int, default=1, help="clips to write (best by CLVP)")
    add_generation_options(ap)
    from .api import DECODERS
    ap.add_argument("--decoder", default=None, choices=DECODERS,
                    help="univnet: tortoise's CLVP-ranked samples, diffusion and UnivNet (default); hifigan: "
                    "api_fast's one sample and HiFi-GAN on its latents (needs the hifigan component)")
    ap.add_argument("--stream", action="store_true",
                    help="speak while generating (HiFi-GAN, so --decoder hifigan): the output grows chunk by chunk")
    ap.add_argument("--stream-chunk-size", type=int, default=40,
                    help="--stream: codes per chunk after the first 60 (default 40)")
    ap.add_argument("--overlap-wav-len", type=int, default=1024,
                    help="--stream: samples crossfaded between chunks (default 1024)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("-o", "--output", default="tortoise.wav",
                    help="output wav (k > 1: NAME_0.wav, NAME_1.wav, ...); '-': raw 16-bit PCM (24 kHz mono, "
                    "little-endian) on stdout")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    try:
        check_output(args.output, allow_stdout=True)
        from .api import TextToSpeech, write_wav
        if not os.path.isfile(args.model):
            raise UsageError(f"no model file {args.model!r}: convert the checkpoints first "
                             "(python -m tortoise_ggml.convert MODELS_DIR -o tortoise.gguf) or pass --model")
        if args.mel:
            mel = np.load(args.mel)
            if mel.ndim == 2:
                mel = mel[None]
            tts = TextToSpeech(args.model, device=args.device, threads=args.threads, components=["vocoder"])
            t0 = time.perf_counter()
            wav = tts.vocoder.inference(mel, seed=args.seed)
            rate = tts.audio_config.output_sample_rate
            write_wav(args.output, wav[0], rate)
            _say(args, f"wrote {args.output} ({wav.shape[-1] / rate:.2f} s of audio in "
                       f"{time.perf_counter() - t0:.2f} s)")
            return 0
        text = args.text
        if args.textfile:
            with open(args.textfile, encoding="utf-8") as f:
                text = f.read()
        text = DEFAULT_TEXT if text is None else text
        if not text.strip():
            raise UsageError("the text is empty")
        if args.stream and args.decoder == "univnet":
            raise UsageError("--stream decodes with HiFi-GAN: use --decoder hifigan (or leave --decoder out)")
        decoder = args.decoder or ("hifigan" if args.stream else "univnet")
        if args.output == "-" and args.candidates != 1:
            raise UsageError("-o - writes one clip: --candidates must be 1")
        tts = TextToSpeech(args.model, device=args.device, threads=args.threads)
        rng = np.random.default_rng(args.seed)
        if decoder == "hifigan" and args.voice in (None, "random"):
            voice = {"conditioning_latents": None}  # the fast path draws a random voice with rlg_auto alone
        else:
            voice = voice_arguments(tts, args, rng)
        latents = voice.get("conditioning_latents")
        if args.stream:
            return _stream(args, tts, text, latents, rng)
        overrides_decoder = {"decoder": decoder} if decoder != "univnet" else {}
        # 0 is a value (and an error the API names), not "use the preset"
        overrides = generation_overrides(args)
        if args.sampler is not None:
            overrides["sampler"] = args.sampler
        t0 = time.perf_counter()
        from .read import plan_text, speak_parts
        parts = plan_text(text, tts.tokenizer, tts.autoregressive.config.max_text_tokens,
                          say=lambda m: _say(args, m))
        if len(parts) > 1:  # long text: spoken part by part (as python -m tortoise_ggml.read), one file
            _say(args, f"the text is spoken in {len(parts)} parts")
            res, stats = speak_parts(tts, parts, args.seed if args.seed is not None else int(rng.integers(2 ** 31)),
                                     preset=args.preset, k=args.candidates, verbose=not args.quiet, **voice,
                                     **overrides, **overrides_decoder)
        else:
            res, stats = tts.tts_with_preset(parts[0] if "|" in text else text, preset=args.preset,
                                             k=args.candidates, seed=rng, verbose=not args.quiet, return_stats=True,
                                             **voice, **overrides, **overrides_decoder)
        elapsed = time.perf_counter() - t0
        clips = res if isinstance(res, list) else [res]
        stem, ext = os.path.splitext(args.output)
        for i, wav in enumerate(clips):
            path = args.output if len(clips) == 1 else f"{stem}_{i}{ext or '.wav'}"
            rate = tts.audio_config.output_sample_rate
            if path == "-":
                sys.stdout.buffer.write(to_pcm16(wav))
                sys.stdout.buffer.flush()
            else:
                write_wav(path, wav, rate)
            _say(args, f"wrote {path} ({wav.shape[-1] / rate:.2f} s of audio)")
        _say(args, f"{elapsed:.1f} s: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in stats.items()))
        return 0
    except user_errors() as e:
        return fail(describe(e))


def _say(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr if args.output == "-" else sys.stdout)


# ------------------------------------------------------------------------------------------------------------------
# --stream
# ------------------------------------------------------------------------------------------------------------------
class WavStreamWriter:
    """A 16-bit mono PCM WAV file written as it grows: after each chunk of samples the RIFF and data sizes in the
    header are rewritten, so at every moment the file is a complete WAV of the samples written so far (the header
    never claims more than is there)."""

    def __init__(self, path: str, sample_rate: int):
        self.sample_rate = int(sample_rate)
        self.nbytes = 0
        self.f = open(path, "wb")
        self.f.write(self._header())
        self.f.flush()

    def _header(self) -> bytes:
        return wav_header(self.sample_rate, self.nbytes // 2)

    def write(self, pcm: bytes) -> None:
        self.f.seek(0, os.SEEK_END)
        self.f.write(pcm)
        self.f.flush()
        self.nbytes += len(pcm)
        self.f.seek(0)
        self.f.write(self._header())
        self.f.flush()

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _stream(args, tts, text: str, latents, rng) -> int:
    """--stream: chunks to the wav (or stdout) as they come, with a progress line (real-time factor) on stderr."""
    rate = tts.audio_config.output_sample_rate
    stream = tts.tts_stream(text, conditioning_latents=latents, seed=rng, stream_chunk_size=args.stream_chunk_size,
                            overlap_wav_len=args.overlap_wav_len,
                            max_mel_tokens=500 if args.max_mel_tokens is None else args.max_mel_tokens)
    out = sys.stdout.buffer if args.output == "-" else WavStreamWriter(args.output, rate)
    tty = sys.stderr.isatty()
    try:
        for chunk in stream:
            out.write(to_pcm16(chunk))
            out.flush()
            st = stream.stats
            if not args.quiet:
                line = (f"{st['audio_s']:.2f} s of audio in {st['elapsed_s']:.2f} s (RTF "
                        f"{st['elapsed_s'] / st['audio_s']:.2f}), first audio after {st['first_chunk_s']:.2f} s, "
                        f"{len(stream.codes)} codes")
                print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    finally:
        stream.close()
        if out is not sys.stdout.buffer:
            out.close()
    st = stream.stats
    if not args.quiet and tty:
        print(file=sys.stderr)
    _say(args, f"wrote {args.output} ({st['audio_s']:.2f} s of audio in {st['elapsed_s']:.2f} s: autoregressive "
               f"{st['autoregressive_s']:.1f} s, hifigan {st['hifigan_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
