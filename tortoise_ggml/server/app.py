"""The FastAPI application: routes, OpenAI-shaped errors, request ids, API key and body limits."""
from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import os
import re
import secrets
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import api as tts_api
from ..utils import diffusion as tts_diffusion
from ..utils.text import split_and_recombine_text
from . import formats
from .engine import DONE, ERROR, ITEM, Engine, QueueFull, ShuttingDown
from .errors import ApiError, bad_request, error_body, error_bytes
from .voices import CLIP_EXTS, FOLDER_SEED, RANDOM, VoiceStore, conditioning_latents

log = logging.getLogger("tortoise_ggml.server")

SPLIT_DESIRED, SPLIT_MAX = 200, 300          # tortoise's read.py split sizes
MAX_CLIPS = 16
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_POLL_S = 0.25                                # how often a waiting request checks that its client is still there


@dataclass
class Settings:
    model_id: str = "tortoise"
    model_created: int = 0
    api_key: str | None = None
    max_input_chars: int = 4096
    max_upload_bytes: int = 20 * 1024 * 1024
    max_json_bytes: int = 1024 * 1024
    sample_rate: int = 24000


# -- the request body ------------------------------------------------------------------------------------------
class VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str


class SpeechRequest(BaseModel):
    """OpenAI's speech body plus Tortoise's knobs (None: the preset's value). Unknown fields are refused (422),
    so a misspelt knob is not silently ignored."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None            # any name is accepted: the one loaded model speaks
    input: str
    voice: str | VoiceRef | None = None  # None: "random"
    response_format: str = "wav"
    speed: float = Field(1.0, ge=0.25, le=4.0)   # accepted and ignored (see README)
    stream_format: str = "audio"
    instructions: str | None = None     # accepted and ignored (Tortoise has no style prompt)
    # Tortoise
    preset: str = "fast"
    num_autoregressive_samples: int | None = Field(None, ge=1, le=512)
    diffusion_iterations: int | None = Field(None, ge=1, le=1000)
    max_mel_tokens: int | None = Field(None, ge=1, le=4096)
    seed: int | None = Field(None, ge=0, le=2 ** 63 - 1)
    cvvp_amount: float | None = Field(None, ge=0, le=1)
    sampler: str | None = None
    decoder: str | None = None
    temperature: float | None = Field(None, gt=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=100000)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    length_penalty: float | None = Field(None, gt=0, le=100)
    cond_free: bool | None = None
    cond_free_k: float | None = Field(None, ge=0, le=100)
    diffusion_temperature: float | None = Field(None, ge=0, le=10)


# passed to tts_with_preset when given
TTS_KNOBS = ("num_autoregressive_samples", "diffusion_iterations", "max_mel_tokens", "cvvp_amount", "temperature",
             "top_p", "top_k", "repetition_penalty", "length_penalty", "cond_free", "cond_free_k",
             "diffusion_temperature", "sampler", "decoder")


def api_choices():
    """Presets, samplers and decoders the API offers, read at each request from api.py (and utils/diffusion.py for
    the samplers), so that new ones are picked up when they are added there."""
    samplers = getattr(tts_api, "SAMPLERS", None) or getattr(tts_diffusion, "SAMPLERS", None) or ("p",)
    return {"preset": tuple(tts_api.PRESETS), "sampler": tuple(samplers),
            "decoder": tuple(getattr(tts_api, "DECODERS", None) or ("univnet",))}


def split_input(text: str) -> list[str]:
    """The parts spoken one by one: '|' marks manual split points; each piece is split with tortoise's
    split_and_recombine_text(200, 300)."""
    parts = []
    for piece in (text.split("|") if "|" in text else [text]):
        parts += split_and_recombine_text(piece, SPLIT_DESIRED, SPLIT_MAX)
    return parts


def _text_token_limit(tts):
    config = getattr(getattr(tts, "autoregressive", None), "config", None)
    return getattr(config, "max_text_tokens", None)


# what tts_stream takes of the request's knobs (the diffusion and candidate ones have no meaning there)
_STREAM_PARAMS = frozenset(inspect.signature(tts_api.TextToSpeech.tts_stream).parameters) - {"self", "text"}


def streams(kwargs: dict) -> bool:
    """Whether a request is spoken chunk by chunk as it is generated: the HiFi-GAN fast path; otherwise every
    part comes whole."""
    return kwargs.get("decoder") == "hifigan"


def speech_work(voices: VoiceStore, voice: str | None, parts: list[str], kwargs: dict, seed: int):
    """The worker's job for one speech request: one item (the part's float audio) per part."""
    def work(tts):
        limit = _text_token_limit(tts)
        if limit:
            for i, part in enumerate(parts):
                n = tts.tokenizer.tts_length(part)
                if n > limit:
                    raise bad_request(f"part {i + 1} of the input is too long for the model ({n} tokens, limit "
                                      f"{limit}): shorten it or add '|' split points", param="input",
                                      code="input_too_long")
        rng = np.random.default_rng(seed)
        latents = voices.latents(tts, voice, rng)
        for part in parts:
            if streams(kwargs):
                # the fast path speaks as it generates: each HiFi-GAN chunk is sent as it is made
                stream_kwargs = {k: v for k, v in kwargs.items() if k in _STREAM_PARAMS}
                for chunk in tts.tts_stream(part, conditioning_latents=latents, seed=rng, **stream_kwargs):
                    yield np.asarray(chunk, np.float32).reshape(-1)
                continue
            wav = tts.tts_with_preset(part, conditioning_latents=latents, seed=rng, verbose=False, **kwargs)
            if isinstance(wav, list):
                wav = wav[0]
            yield np.asarray(wav, np.float32).reshape(-1)
    return work


def upload_work(voices: VoiceStore, name: str, clips: list[tuple[str, bytes]]):
    """The worker's job for POST /v1/voices: write the clips to a temporary folder, compute the latents, keep them."""
    def work(tts):
        with tempfile.TemporaryDirectory(prefix="tortoise-voice-") as tmp:
            paths = []
            for i, (filename, data) in enumerate(clips):
                ext = os.path.splitext(filename)[1].lower()
                path = os.path.join(tmp, f"clip{i}{ext if ext in CLIP_EXTS + ('.ogg',) else ''}")
                with open(path, "wb") as f:
                    f.write(data)
                paths.append(path)
            latents = conditioning_latents(tts, paths, FOLDER_SEED, names=[c[0] for c in clips])
        voices.add_uploaded(name, latents)
        yield {"id": name, "object": "voice", "source": "uploaded", "clips": len(clips)}
    return work


def as_api_error(e: BaseException, request_id: str) -> ApiError:
    """What a job's failure tells the client: bad input is a 4xx, never a 500."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ShuttingDown):
        return ApiError(503, "the server is shutting down: retry on another replica", code="shutting_down")
    if isinstance(e, getattr(tts_api, "MissingComponent", ())):     # e.g. decoder="hifigan" on a file without it
        return bad_request(str(e), code="unsupported_by_model")
    if isinstance(e, NotImplementedError):
        return bad_request(str(e) or "not implemented", code="not_implemented")
    if isinstance(e, (ValueError, KeyError)):
        return bad_request(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e), code="invalid_value")
    return ApiError(500, f"internal error (request {request_id}): {type(e).__name__}", code="internal_error")


class _AbortableStream(StreamingResponse):
    """A StreamingResponse that can end without its final empty chunk: when the body iterator yields None the
    response stops there, uvicorn closes the connection, and the client sees an incomplete chunked body instead of
    audio that merely looks short."""

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            if chunk is None:
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# -- the gate: request ids, access log, API key, body limits ---------------------------------------------------
class Gate:
    """Pure ASGI middleware (streaming-safe): gives every request an id (X-Request-ID, echoed), logs one line per
    request, checks ``Authorization: Bearer KEY`` on everything but /health, and limits body sizes (413)."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id", "")
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.monotonic()
        info = {"status": None, "bytes": 0, "complete": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = rid
                info["status"] = message["status"]
            elif message["type"] == "http.response.body":
                info["bytes"] += len(message.get("body", b""))
                info["complete"] = not message.get("more_body", False)
            await send(message)

        async def reply(status, message, extra_headers=(), **kw):
            body = error_bytes(status, message, **kw)
            await send_wrapper({"type": "http.response.start", "status": status,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode()), *extra_headers]})
            await send_wrapper({"type": "http.response.body", "body": body})

        path, method = scope.get("path", ""), scope.get("method", "")
        try:
            key = self.settings.api_key
            if key is not None and path != "/health":
                auth = headers.get("authorization", "")
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(given.encode(), key.encode()):
                    await _drain(receive, 1 << 20)
                    await reply(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                extra_headers=[(b"www-authenticate", b"Bearer")], code="invalid_api_key")
                    return
            limit = self.settings.max_upload_bytes if path == "/v1/voices" else self.settings.max_json_bytes
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await _drain(receive, 4 * limit)
                await reply(413, f"request body too large ({int(declared)} bytes, limit {limit})",
                            code="request_too_large")
                return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise ApiError(413, f"request body too large (limit {limit} bytes)",
                                       code="request_too_large")
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            status = info["status"] if info["complete"] else f"{info['status']} (incomplete)"
            log.info("[%s] %s %s -> %s, %d bytes, %.2f s", rid, method, path, status, info["bytes"],
                     time.monotonic() - t0)


async def _drain(receive, cap: int) -> None:
    """Read and discard the request body (up to ``cap`` bytes), so that the client reads our error reply."""
    seen = 0
    while seen <= cap:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


# -- the application -------------------------------------------------------------------------------------------
def create_app(engine: Engine, voices: VoiceStore, settings: Settings) -> FastAPI:
    tts_params = set(inspect.signature(type(engine.tts).tts).parameters)
    supported = formats.supported_formats()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            # uvicorn has waited for the open requests by now (the running job's included); stop the worker
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="tortoise-ggml", summary="Tortoise TTS on ggml, OpenAI's speech API", lifespan=lifespan)
    app.state.engine, app.state.voices, app.state.settings = engine, voices, settings

    # -- errors ------------------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return JSONResponse(error_body(400, f"could not parse the JSON body of the request: {detail}".rstrip(": "),
                                           code="invalid_json"), status_code=400)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        message = f"{param}: {msg}" if param else msg
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return JSONResponse(error_body(422, message, param=param, code=first.get("type")), status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        rid = request.scope.get("state", {}).get("request_id", "?")
        log.exception("[%s] internal error", rid)
        return JSONResponse(error_body(500, f"internal error (request {rid})", code="internal_error"),
                            status_code=500)

    def request_id(request: Request) -> str:
        return request.scope.get("state", {}).get("request_id", "-")

    def submit(work, rid, label):
        try:
            return engine.submit(work, rid, label)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({engine.max_queue} jobs waiting): retry in {e.retry_after} s",
                           code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down: retry on another replica",
                           code="shutting_down") from None

    async def wait_item(job, request: Request):
        """The job's next (kind, value), or None when the client went away first (the job is then cancelled)."""
        getter = asyncio.ensure_future(job.next())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=_POLL_S)
                if done:
                    return getter.result()
                if await request.is_disconnected():
                    engine.cancel(job)
                    return None
        except asyncio.CancelledError:
            engine.cancel(job, "request cancelled")
            raise
        finally:
            if not getter.done():
                getter.cancel()

    async def first_result(job, request: Request, rid: str, what: str):
        """The job's first item, or None when the client went away (answer 499); a job error as its API error."""
        got = await wait_item(job, request)
        if got is None:
            return None
        kind, value = got
        if kind == ERROR:
            raise as_api_error(value, rid)
        if kind != ITEM:
            raise ApiError(500, f"the {what} job ended without a result", code="internal_error")
        return value

    # -- routes ------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        status = engine.status()
        ok = not status["closing"]
        return JSONResponse({"status": "ok" if ok else "shutting_down", "model": settings.model_id,
                             "queue": status}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(settings)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != settings.model_id:
            raise ApiError(404, f"model {model_id!r} not found; this server has {settings.model_id!r}",
                           param="model", code="model_not_found")
        return _model_card(settings)

    @app.get("/v1/voices")
    async def list_voices():
        return {"object": "list", "data": voices.list()}

    @app.delete("/v1/voices/{name}")
    async def delete_voice(name: str):
        if not voices.delete_uploaded(name):
            raise ApiError(404, f"no uploaded voice {name!r} (only uploaded voices can be deleted)", param="name",
                           code="voice_not_found")
        return {"id": name, "object": "voice", "deleted": True}

    @app.post("/v1/voices", status_code=201)
    async def upload_voice(request: Request):
        """multipart/form-data: ``name`` and one or more audio files (any field name; wav, mp3, flac, ogg)."""
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise bad_request("send multipart/form-data: a 'name' field and one or more audio files ('files')",
                              code="invalid_content_type")
        from starlette.formparsers import MultiPartException
        try:
            form = await request.form(max_files=MAX_CLIPS, max_fields=16)
        except MultiPartException as e:
            raise bad_request(f"bad multipart body: {e.message}", code="invalid_multipart") from None
        try:
            name = form.get("name")
            if not isinstance(name, str) or not name.strip():
                raise bad_request("the form needs a 'name' field", param="name", code="missing_name")
            name = voices.check_upload_name(name.strip())
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                raise bad_request("the form needs one or more audio files", param="files", code="missing_files")
            clips = []
            for f in files:
                data = await f.read()
                if not data:
                    raise bad_request(f"audio file {f.filename!r} is empty", param="files", code="empty_file")
                clips.append((f.filename or f"clip{len(clips)}", data))
        finally:
            await form.close()
        rid = request_id(request)
        job = submit(upload_work(voices, name, clips), rid, f"voice upload {name!r}")
        value = await first_result(job, request, rid, "voice")
        if value is None:
            return Response(status_code=499)
        return JSONResponse(value, status_code=201)

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest, request: Request):
        rid = request_id(request)
        text = body.input
        if not text.strip():
            raise bad_request("input is empty", param="input", code="empty_input")
        if len(text) > settings.max_input_chars:
            raise bad_request(f"input is too long ({len(text)} characters, limit {settings.max_input_chars})",
                              param="input", code="input_too_long")
        fmt = body.response_format
        if fmt not in formats.MEDIA_TYPES:
            raise bad_request(f"unknown response_format {fmt!r}: use one of {', '.join(supported)}",
                              param="response_format", code="invalid_response_format")
        if fmt not in supported:
            raise bad_request(f"response_format {fmt!r} is not supported by this server: use one of "
                              f"{', '.join(supported)}", param="response_format", code="unsupported_response_format")
        if body.stream_format == "sse":
            raise bad_request("stream_format 'sse' is not supported: use 'audio' (audio is sent part by part)",
                              param="stream_format", code="unsupported_stream_format")
        if body.stream_format != "audio":
            raise bad_request(f"unknown stream_format {body.stream_format!r}: use 'audio'", param="stream_format",
                              code="invalid_stream_format")
        choices = api_choices()
        for param in ("preset", "sampler", "decoder"):
            value = getattr(body, param)
            if value is not None and value not in choices[param]:
                raise bad_request(f"unknown {param} {value!r}: choose from {', '.join(choices[param])}",
                                  param=param, code=f"invalid_{param}")
        kwargs = {"preset": body.preset}
        for knob in TTS_KNOBS:
            value = getattr(body, knob)
            if value is None:
                continue
            if knob in tts_params:
                kwargs[knob] = value
            elif value != choices.get(knob, (None,))[0]:       # the only sampler/decoder the API has: nothing to pass
                raise bad_request(f"{knob} is not supported by this build of TextToSpeech", param=knob,
                                  code="unsupported_parameter")
        voice = body.voice.id if isinstance(body.voice, VoiceRef) else body.voice
        voices.source(voice)                      # 400 for a bad name, 404 for an unknown voice: before queueing
        parts = split_input(text)
        if not parts:
            raise bad_request("input has nothing to speak (only whitespace and punctuation)", param="input",
                              code="empty_input")
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        log.info("[%s] speech: %d chars in %d part(s), voice %s, preset %s, format %s, seed %d%s", rid, len(text),
                 len(parts), voice or RANDOM, body.preset, fmt, seed,
                 f" (speed {body.speed:g} ignored)" if body.speed != 1 else "")
        job = submit(speech_work(voices, voice, parts, kwargs, seed), rid, "speech")
        headers = {"X-Tortoise-Seed": str(seed), "X-Tortoise-Parts": str(len(parts)), "Cache-Control": "no-store"}
        media_type = formats.MEDIA_TYPES[fmt]
        sr = settings.sample_rate

        if fmt not in formats.STREAMED:                    # encoded whole: wait for every part
            wavs = []
            while True:
                got = await wait_item(job, request)
                if got is None:
                    return Response(status_code=499)
                kind, value = got
                if kind == ERROR:
                    raise as_api_error(value, rid)
                if kind == DONE:
                    break
                wavs.append(value)
            loop = asyncio.get_running_loop()
            data = await loop.run_in_executor(None, formats.encode_whole, fmt, np.concatenate(wavs), sr)
            return Response(data, media_type=media_type, headers=headers)

        value = await first_result(job, request, rid, "speech")   # the first part decides the status
        if value is None:
            return Response(status_code=499)

        async def stream(first):
            try:
                pcm = formats.to_pcm16(first)
                if fmt == "wav":
                    whole = len(parts) == 1 and not streams(kwargs)       # else the length is not known yet
                    pcm = formats.wav_header(sr, len(pcm) // 2 if whole else None) + pcm
                yield pcm
                part = 1
                while True:
                    kind, value = await job.next()
                    if kind == DONE:
                        return
                    if kind == ERROR:
                        log.warning("[%s] part %d of %d failed after the audio began (%s: %s): closing the "
                                    "connection", rid, part + 1, len(parts), type(value).__name__, value)
                        yield None
                        return
                    part += 1
                    yield formats.to_pcm16(value)
            finally:
                engine.cancel(job)           # a no-op once the job is done; stops it when the client went away

        return _AbortableStream(stream(value), media_type=media_type, headers=headers)

    return app


def _model_card(settings: Settings) -> dict:
    choices = api_choices()
    return {"id": settings.model_id, "object": "model", "created": settings.model_created,
            "owned_by": "tortoise-ggml",
            "tortoise": {"presets": list(choices["preset"]), "samplers": list(choices["sampler"]),
                         "decoders": list(choices["decoder"]), "response_formats": list(formats.supported_formats())}}
