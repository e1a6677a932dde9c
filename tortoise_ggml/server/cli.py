"""python -m tortoise_ggml.server --model tortoise.gguf [--host 127.0.0.1] [--port 8000] [--voices-dir DIR]
[--api-key KEY] [--threads N] [--max-queue N]

An OpenAI-compatible speech server (POST /v1/audio/speech) for one Tortoise model file.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import sys

log = logging.getLogger("tortoise_ggml.server")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):          # one line, exit code 2
        raise UsageError(message)


def _positive(kind):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v
    return parse


def _non_negative_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m tortoise_ggml.server", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("TORTOISE_GGML_MODEL", "tortoise.gguf"),
                    help="GGUF from python -m tortoise_ggml.convert (default: $TORTOISE_GGML_MODEL or tortoise.gguf)")
    ap.add_argument("--model-id", default=None, help="the model's name in /v1/models (default: the file's stem)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=_non_negative_int, default=8000, help="port (default 8000; 0: any free port)")
    ap.add_argument("--voices-dir", default=None, help="folder of voices: one subfolder of .wav/.mp3/.flac clips each")
    ap.add_argument("--api-key", default=os.environ.get("TORTOISE_GGML_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $TORTOISE_GGML_API_KEY; none: open)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=_positive(int), default=None, help="CPU threads (default: all)")
    ap.add_argument("--max-queue", type=_non_negative_int, default=8,
                    help="jobs that may wait behind the running one; more get 429 (default 8)")
    ap.add_argument("--max-input-chars", type=_positive(int), default=4096, help="longest input (default 4096)")
    ap.add_argument("--max-upload-mb", type=_positive(float), default=20.0,
                    help="largest voice upload, all clips together (default 20 MB)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap


def main(argv=None) -> int:
    try:
        args = parser().parse_args(argv)
        if args.port > 65535:
            raise UsageError(f"--port must be in 0..65535, got {args.port}")
        if not os.path.isfile(args.model):
            raise UsageError(f"no model file {args.model!r}: convert the checkpoints first "
                             "(python -m tortoise_ggml.convert MODELS_DIR -o tortoise.gguf) or pass --model")
        if args.voices_dir is not None and not os.path.isdir(args.voices_dir):
            raise UsageError(f"--voices-dir {args.voices_dir!r} is not a directory")
        if args.api_key is not None and not args.api_key.strip():
            raise UsageError("--api-key is empty")
        missing = [pkg for pkg, mods in (("fastapi", ["fastapi"]), ("uvicorn", ["uvicorn"]),
                                         ("python-multipart", ["python_multipart", "multipart"]))
                   if not any(importlib.util.find_spec(m) for m in mods)]
        if missing:
            raise UsageError(f"the server needs {', '.join(missing)}: pip install 'tortoise-ggml[server]'")
        sock = _bind(args.host, args.port)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..api import OUTPUT_SAMPLE_RATE, TextToSpeech
    from .app import Settings, create_app
    from .engine import Engine
    from .voices import VoiceStore
    try:
        tts = TextToSpeech(args.model, device=args.device, threads=args.threads)
    except Exception as e:  # noqa: BLE001 - a bad model file is a bad argument: one line, exit 2
        sock.close()
        print(f"error: cannot load {args.model!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    settings = Settings(model_id=args.model_id or os.path.splitext(os.path.basename(args.model))[0],
                        model_created=int(os.path.getmtime(args.model)), api_key=args.api_key,
                        max_input_chars=args.max_input_chars, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                        sample_rate=getattr(getattr(tts, "audio_config", None), "output_sample_rate",
                                            OUTPUT_SAMPLE_RATE))
    engine = Engine(tts, max_queue=args.max_queue)
    voices = VoiceStore(tts.model_file.voices, args.voices_dir)
    app = create_app(engine, voices, settings)
    return serve(app, engine, sock, args.log_level, settings)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(app, engine, sock: socket.socket, log_level: str, settings) -> int:
    import uvicorn

    from .app import Gate

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # refuse queued jobs (503) before uvicorn waits for the open requests: only the running job finishes
            engine.begin_shutdown()
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(Gate(app, settings), log_config=None, log_level=log_level, access_log=False,
                            lifespan="on", timeout_keep_alive=5)
    host, port = sock.getsockname()[:2]
    log.info("serving %s on http://%s:%d (auth %s, max queue %d)", settings.model_id,
             f"[{host}]" if ":" in host else host, port, "on" if settings.api_key else "off", engine.max_queue)
    if not settings.api_key and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the server", host)
    Server(config).run(sockets=[sock])
    return 0
