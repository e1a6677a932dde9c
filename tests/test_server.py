"""The OpenAI-compatible server (python -m tortoise_ggml.server) as a real subprocess on the small random model:
the openai client, streaming, voices and uploads, every bad request, queue limits, cancellation, a bounded load
test and graceful shutdown."""
import importlib.util
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
    pytest.skip("the server's uploads need python-multipart", allow_module_level=True)
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
sf = pytest.importorskip("soundfile")

SERVER = [sys.executable, "-m", "tortoise_ggml.server"]
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# the smallest job: one AR sample of at most 20 codes, two diffusion steps (about 1 s of audio)
TINY = {"preset": "ultra_fast", "num_autoregressive_samples": 1, "diffusion_iterations": 2, "max_mel_tokens": 20,
        "seed": 1}
SR = 24000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *args, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([*SERVER, "--model", str(model), "--port", str(self.port), "--threads", "2",
                                      *map(str, args)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not come up:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-6000:]

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def wait_idle(self, timeout=60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if h["queue"]["running"] is None and h["queue"]["queued"] == 0:
                return h
            if time.monotonic() > deadline:
                raise AssertionError(f"the server stayed busy: {h}")
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


def write_clip(path, seconds=1.5, sr=22050, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(str(path), wav.astype(np.float32), sr)


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("voices")
    (root / "clipvoice").mkdir()
    write_clip(root / "clipvoice" / "a.wav")
    (root / "emptyvoice").mkdir()                      # no clips: not a voice
    (root / "notes.txt").write_text("not a voice")
    return root


@pytest.fixture(scope="module")
def voiced_gguf(small_ckpt_dir, small_gguf, tmp_path_factory):
    """The small model with one stored voice ("storedvoice": precomputed latents, as convert --voices stores)."""
    torch = pytest.importorskip("torch")
    from tortoise_ggml.api import TextToSpeech
    from tortoise_ggml.convert import convert
    ar, diff = TextToSpeech(small_gguf, threads=1).get_random_conditioning_latents(seed=3)
    vd = tmp_path_factory.mktemp("stored_voices")
    (vd / "storedvoice").mkdir()
    torch.save((torch.from_numpy(np.asarray(ar)), torch.from_numpy(np.asarray(diff))), vd / "storedvoice" / "v.pth")
    return convert(small_ckpt_dir, tmp_path_factory.mktemp("gguf_voiced") / "tortoise-voiced.gguf", type="f32",
                   voices_dir=vd)


@pytest.fixture(scope="module")
def server(voiced_gguf, voices_dir, tmp_path_factory):
    s = Server(voiced_gguf, "--api-key", KEY, "--voices-dir", voices_dir, "--max-queue", "2", "--max-upload-mb", "1",
               log_path=tmp_path_factory.mktemp("server") / "server.log")
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def speech(client, **body):
    return client.post("/v1/audio/speech", json={"model": "tortoise", "voice": "random", "input": "Hello there.",
                                                 "response_format": "wav", **TINY, **body})


def decode(data: bytes):
    wav, sr = sf.read(io.BytesIO(data), dtype="float32")
    return wav, sr


def assert_openai_error(r, status, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body
    assert r.headers.get("x-request-id")
    return body["error"]


# -- the openai client ---------------------------------------------------------------------------------------------
def test_openai_client_wav_and_streamed_pcm(server):
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    r = oa.audio.speech.create(model="tortoise", voice="random", input="Hello there.", response_format="wav",
                               extra_body=TINY)
    wav, sr = decode(r.content)
    assert sr == SR and wav.ndim == 1 and len(wav) > 0
    assert np.all(np.isfinite(wav))
    # the whole WAV of a one-part input has exact sizes
    assert struct.unpack("<I", r.content[40:44])[0] == len(r.content) - 44

    with oa.audio.speech.with_streaming_response.create(model="tortoise", voice="random", input="Hello there.",
                                                        response_format="pcm", extra_body=TINY) as resp:
        assert resp.headers["content-type"].startswith("audio/pcm")
        pcm = b"".join(resp.iter_bytes())
    assert len(pcm) % 2 == 0
    assert len(pcm) // 2 == len(wav)                 # same seed, same audio
    np.testing.assert_allclose(np.frombuffer(pcm, "<i2") / 32767.0, wav, atol=1e-4)


def test_long_input_is_streamed_part_by_part(client):
    text = "The first part is here. | And this is the second one."
    with client.stream("POST", "/v1/audio/speech", json={"input": text, "response_format": "wav", **TINY}) as r:
        assert r.status_code == 200
        assert r.headers["x-tortoise-parts"] == "2"
        assert "content-length" not in r.headers      # chunked: sent as each part finishes
        chunks = list(r.iter_raw())
    data = b"".join(chunks)
    assert data[:4] == b"RIFF" and struct.unpack("<I", data[4:8])[0] == 0xFFFFFFFF
    assert struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    wav, sr = decode(data)
    assert sr == SR and len(wav) == (len(data) - 44) // 2
    pcm = client.post("/v1/audio/speech", json={"input": text, "response_format": "pcm", **TINY})
    assert pcm.status_code == 200 and len(pcm.content) == len(data) - 44


def test_hifigan_fast_path_streams_chunks_as_they_are_made(client):
    """decoder=hifigan: tts_stream's chunks go out as they are made (a streaming WAV header even for one part)."""
    body = {"input": "Hello there.", "decoder": "hifigan", "max_mel_tokens": 20, "seed": 3}
    with client.stream("POST", "/v1/audio/speech", json={"response_format": "wav", **body}) as r:
        assert r.status_code == 200, r.read()
        assert "content-length" not in r.headers
        data = b"".join(r.iter_raw())
    assert data[:4] == b"RIFF" and struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    wav, sr = decode(data)
    assert sr == SR and len(wav) > 0 and np.all(np.isfinite(wav))
    pcm = client.post("/v1/audio/speech", json={"response_format": "pcm", **body})
    assert pcm.status_code == 200 and pcm.content == data[44:]          # same seed, same chunks


def test_flac_is_encoded_whole(client):
    r = speech(client, response_format="flac")
    assert r.status_code == 200 and r.headers["content-type"] == "audio/flac"
    wav, sr = decode(r.content)
    assert sr == SR and len(wav) > 0


def test_models_health_and_request_id(client, voiced_gguf):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    card = models["data"][0]
    assert card["object"] == "model" and card["id"] == os.path.splitext(os.path.basename(voiced_gguf))[0]
    assert client.get(f"/v1/models/{card['id']}").status_code == 200
    knobs = card["tortoise"]
    assert {"ultra_fast", "fast", "standard", "high_quality"} <= set(knobs["presets"])
    assert "p" in knobs["samplers"] and "univnet" in knobs["decoders"]
    assert {"wav", "pcm"} <= set(knobs["response_formats"])
    if "ddim" in knobs["samplers"]:                  # a sampler the API offers reaches it
        r = speech(client, sampler="ddim")
        assert r.status_code == 200 and len(decode(r.content)[0]) > 0
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert client.get("/v1/voices", headers={"X-Request-ID": "my-req-1"}).headers["x-request-id"] == "my-req-1"
    assert speech(client, input="Hi.").headers["x-request-id"] != speech(client, input="Hi.").headers["x-request-id"]


# -- voices --------------------------------------------------------------------------------------------------------
def test_voices_folder_and_upload(client, tmp_path):
    ids = {v["id"]: v["source"] for v in client.get("/v1/voices").json()["data"]}
    assert ids["random"] == "random" and ids["clipvoice"] == "voices_dir" and ids["storedvoice"] == "model_file"
    assert "emptyvoice" not in ids and "notes.txt" not in ids

    for voice in ("clipvoice", "storedvoice"):
        r = speech(client, voice=voice)
        assert r.status_code == 200 and len(decode(r.content)[0]) > 0

    write_clip(tmp_path / "one.wav", seed=1)
    write_clip(tmp_path / "two.flac", seed=2)
    files = [("files", ("one.wav", (tmp_path / "one.wav").read_bytes(), "audio/wav")),
             ("files", ("two.flac", (tmp_path / "two.flac").read_bytes(), "audio/flac"))]
    r = client.post("/v1/voices", data={"name": "mine"}, files=files)
    assert r.status_code == 201, r.text
    assert r.json() == {"id": "mine", "object": "voice", "source": "uploaded", "clips": 2}
    assert {"id": "mine", "object": "voice", "source": "uploaded"} in client.get("/v1/voices").json()["data"]
    r = speech(client, voice="mine")
    assert r.status_code == 200 and len(decode(r.content)[0]) > 0
    # the openai client's voice object form
    r = speech(client, voice={"id": "mine"})
    assert r.status_code == 200
    assert client.delete("/v1/voices/mine").status_code == 200
    assert_openai_error(speech(client, voice="mine"), 404, "voice")
    assert_openai_error(client.delete("/v1/voices/mine"), 404)


@pytest.mark.parametrize("name, files, status, param", [
    ("../x", None, 400, "name"),
    ("random", None, 400, "name"),
    ("clipvoice", None, 400, "name"),
    ("storedvoice", None, 400, "name"),
    ("ok", [], 400, "files"),
    ("", None, 400, "name"),
    ("ok", [("files", ("junk.wav", b"this is not audio", "audio/wav"))], 400, None),
    ("ok", [("files", ("big.wav", b"\0" * (1024 * 1024 + 10), "audio/wav"))], 413, None),
])
def test_bad_uploads(client, tmp_path, name, files, status, param):
    if files is None:
        write_clip(tmp_path / "c.wav")
        files = [("files", ("c.wav", (tmp_path / "c.wav").read_bytes(), "audio/wav"))]
    if files:
        r = client.post("/v1/voices", data={"name": name}, files=files)
    else:                                    # httpx sends a form without files urlencoded: write the multipart body
        body = f'--b0\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n--b0--\r\n'.encode()
        r = client.post("/v1/voices", content=body, headers={"content-type": "multipart/form-data; boundary=b0"})
    assert_openai_error(r, status, param)


def test_upload_must_be_multipart(client):
    assert_openai_error(client.post("/v1/voices", json={"name": "x"}), 400)


# -- bad requests --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, param", [
    ({"preset": "turbo"}, 400, "preset"),
    ({"input": ""}, 400, "input"),
    ({"input": "   \n "}, 400, "input"),
    ({"input": "... !!"}, 400, "input"),
    ({"input": "a " * 2100}, 400, "input"),            # 4200 characters: over --max-input-chars
    ({"voice": "../x"}, 400, "voice"),
    ({"voice": "a/b"}, 400, "voice"),
    ({"voice": "/etc"}, 400, "voice"),
    ({"voice": "..\\x"}, 400, "voice"),
    ({"voice": ".hidden"}, 400, "voice"),
    ({"voice": "x" * 200}, 400, "voice"),
    ({"voice": "alloy"}, 404, "voice"),
    ({"voice": "emptyvoice"}, 404, "voice"),
    ({"response_format": "aac"}, 400, "response_format"),
    ({"response_format": "ogg"}, 400, "response_format"),
    ({"stream_format": "sse"}, 400, "stream_format"),
    ({"stream_format": "video"}, 400, "stream_format"),
    ({"sampler": "ddim-nonexistent"}, 400, "sampler"),
    ({"decoder": "nonexistent"}, 400, "decoder"),
    ({"diffusion_iterations": 0}, 422, "diffusion_iterations"),
    ({"num_autoregressive_samples": "many"}, 422, "num_autoregressive_samples"),
    ({"seed": -1}, 422, "seed"),
    ({"speed": 10}, 422, "speed"),
    ({"diffusion_iteration": 2}, 422, "diffusion_iteration"),   # a misspelt knob is refused, not ignored
    ({"input": 5}, 422, "input"),
    ({"max_mel_tokens": 4000}, 400, None),           # refused by TextToSpeech in the worker: still a 400
])
def test_bad_speech_requests(client, body, status, param):
    err = assert_openai_error(speech(client, **body), status, param)
    if body.get("voice") == "alloy":
        assert "random" in err["message"] and "clipvoice" in err["message"]


def test_bad_requests_raw(server, client):
    r = client.post("/v1/audio/speech", content=b'{"input": "hi", ', headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    assert_openai_error(client.post("/v1/audio/speech", json={"voice": "random"}), 422, "input")
    assert_openai_error(client.post("/v1/audio/speech", json=[1, 2]), 422)
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/audio/speech"), 405)
    assert_openai_error(client.get("/v1/models/other"), 404, "model")
    # API key
    body = {"input": "hi", **TINY}
    assert_openai_error(httpx.post(server.url + "/v1/audio/speech", json=body), 401)
    assert_openai_error(httpx.post(server.url + "/v1/audio/speech", json=body,
                                   headers={"Authorization": "Bearer wrong"}), 401)
    assert_openai_error(httpx.get(server.url + "/v1/models", headers={"Authorization": KEY}), 401)
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        oa.audio.speech.create(model="tortoise", voice="random", input="hi", extra_body=TINY)
    assert httpx.get(server.url + "/health").status_code == 200       # open without the key
    # a JSON body over the limit
    assert_openai_error(client.post("/v1/audio/speech", content=b" " * (1024 * 1024 + 1),
                                    headers={"content-type": "application/json"}), 413)
    assert server.proc.poll() is None


# -- queue, cancellation, load -------------------------------------------------------------------------------------
def _parts(n):
    return " | ".join(f"Part number {i} is spoken here." for i in range(n))


def test_client_disconnect_cancels(server, client):
    server.wait_idle()
    before = server.health()["queue"]
    # a running multi-part job whose client leaves after the first part stops at the next part boundary
    with client.stream("POST", "/v1/audio/speech", json={"input": _parts(8), "response_format": "pcm", **TINY}) as r:
        assert r.status_code == 200
        next(r.iter_raw())
    h = server.wait_idle(30)["queue"]
    assert h["cancelled"] == before["cancelled"] + 1 and h["done"] == before["done"]

    # a queued job whose client leaves is dropped before it runs
    results = {}

    def long_job():
        results["long"] = client.post("/v1/audio/speech", json={"input": _parts(12), "response_format": "pcm",
                                                                 **TINY})

    t = threading.Thread(target=long_job)
    t.start()
    deadline = time.monotonic() + 30
    while server.health()["queue"]["running"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/audio/speech", json={"input": "Hello there.", **TINY}, headers=AUTH,
                   timeout=httpx.Timeout(5, read=0.2))
    t.join(60)
    assert results["long"].status_code == 200
    h = server.wait_idle(30)["queue"]
    assert h["cancelled"] == before["cancelled"] + 2 and h["done"] == before["done"] + 1
    assert h["failed"] == before["failed"]


def test_bounded_load(server):
    """6 clients x 2 requests per round with --max-queue 2: every request ends in audio or a 429 (or is cancelled
    by its client, as one in four are); nothing crashes; RSS does not grow across rounds."""
    failed_before = server.wait_idle()["queue"]["failed"]
    failures, outcomes, rss = [], [], []

    def client_thread(i, round_):
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
            for j in range(2):
                body = {"input": "Hello there." if (i + j) % 3 else "One part. | Two parts.",
                        "response_format": ("wav", "pcm")[(i + j) % 2], **TINY, "seed": i}
                try:
                    if (i + j + round_) % 4 == 0:            # leaves mid-request
                        with c.stream("POST", "/v1/audio/speech", json=body) as r:
                            if r.status_code == 200:
                                next(r.iter_raw(), None)
                        outcomes.append("cancelled")
                        continue
                    r = c.post("/v1/audio/speech", json=body)
                    if r.status_code == 429:
                        assert int(r.headers["retry-after"]) >= 1
                        assert r.json()["error"]["code"] == "queue_full"
                        outcomes.append("429")
                    else:
                        assert r.status_code == 200, r.text
                        if body["response_format"] == "wav":
                            wav, sr = decode(r.content)
                            assert sr == SR and len(wav) > 0
                        else:
                            assert len(r.content) > 0 and len(r.content) % 2 == 0
                        outcomes.append("audio")
                except Exception as e:  # noqa: BLE001
                    failures.append(f"client {i} request {j}: {type(e).__name__}: {e}")

    for round_ in range(4):
        threads = [threading.Thread(target=client_thread, args=(i, round_)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        server.wait_idle()
        rss.append(server.rss_mb())
    assert not failures, failures
    assert outcomes.count("audio") >= 4 and "429" in outcomes, outcomes
    h = server.health()
    assert h["status"] == "ok" and h["queue"]["failed"] == failed_before, h
    # the first round warms graphs and allocators; after it, memory stays put
    assert rss[-1] - rss[1] < 40, rss
    assert server.proc.poll() is None


# -- a failure after the audio began (in process, with a stand-in for TextToSpeech) -------------------------------
class _FakeModelFile:
    voices = []


class _FakeTTS:
    """Fast stand-in: 0.1 s of audio per part; a part saying FAIL raises an internal error, BAD a ValueError."""
    model_file = _FakeModelFile()

    def get_random_conditioning_latents(self, seed=None):
        return np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32)

    def tts_with_preset(self, text, preset="fast", **kwargs):
        return self.tts(text, **kwargs)

    def tts(self, text, conditioning_latents=None, seed=None, verbose=False, num_autoregressive_samples=1,
            diffusion_iterations=1, max_mel_tokens=500):
        if "FAIL" in text:
            raise RuntimeError("stand-in failure")
        if "BAD" in text:
            raise ValueError("stand-in bad value")
        return np.full((1, 2400), 0.25, np.float32)


@pytest.fixture()
def fake_server():
    import uvicorn

    from tortoise_ggml.server.app import Gate, Settings, create_app
    from tortoise_ggml.server.engine import Engine
    from tortoise_ggml.server.voices import VoiceStore
    settings = Settings(model_id="fake")
    tts = _FakeTTS()
    app = create_app(Engine(tts, max_queue=2), VoiceStore([], None), settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Gate(app, settings), host="127.0.0.1", port=port, log_config=None,
                                           lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(30)


def test_failure_after_audio_began_aborts_the_response(fake_server):
    body = {"input": "Fine. | FAIL here.", "response_format": "pcm"}
    with httpx.Client(base_url=fake_server, timeout=30) as c:
        with c.stream("POST", "/v1/audio/speech", json=body) as r:
            assert r.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):   # not a complete body that merely looks short
                for _ in r.iter_raw():
                    pass
        r = c.post("/v1/audio/speech", json={"input": "FAIL first.", "response_format": "pcm"})
        err = assert_openai_error(r, 500)
        assert err["code"] == "internal_error" and "stand-in" not in err["message"]
        assert_openai_error(c.post("/v1/audio/speech", json={"input": "BAD first."}), 400)
        r = c.post("/v1/audio/speech", json={"input": "Fine. | Also fine.", "response_format": "pcm"})
        assert r.status_code == 200 and len(r.content) == 2 * 2 * 2400
        assert c.get("/health").json()["queue"]["failed"] == 3


# -- shutdown and the command line ---------------------------------------------------------------------------------
def test_graceful_shutdown(small_gguf, tmp_path):
    s = Server(small_gguf, "--max-queue", "2", log_path=tmp_path / "server.log")
    try:
        results = {}

        def post(key, text):
            try:
                results[key] = httpx.post(s.url + "/v1/audio/speech",
                                          json={"input": text, "response_format": "pcm", **TINY}, timeout=60)
            except httpx.HTTPError as e:
                results[key] = e

        running = threading.Thread(target=post, args=("running", _parts(4)))
        running.start()
        deadline = time.monotonic() + 30
        while s.health()["queue"]["running"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        queued = threading.Thread(target=post, args=("queued", "Hello there."))
        queued.start()
        while s.health()["queue"]["queued"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        running.join(60)
        queued.join(60)
        s.proc.wait(60)
        assert isinstance(results["running"], httpx.Response), (results, s.log())
        assert results["running"].status_code == 200 and len(results["running"].content) > 0
        assert isinstance(results["queued"], httpx.Response), (results, s.log())
        assert_openai_error(results["queued"], 503)
        assert "shutting down" in s.log().lower()
    finally:
        s.stop()


def _cli(*args, timeout=60):
    p = subprocess.run([*SERVER, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stderr.strip().splitlines()


def test_cli_errors(tmp_path):
    rc, err = _cli("--model", tmp_path / "missing.gguf")
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "missing.gguf" in err[0]
    model = tmp_path / "x.gguf"
    model.write_bytes(b"not a gguf")
    for args in (["--port", "x"], ["--port", "70000"], ["--max-queue", "-1"], ["--threads", "0"],
                 ["--voices-dir", tmp_path / "nope"], ["--bogus"]):
        rc, err = _cli("--model", model, *args)
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (args, err)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rc, err = _cli("--model", model, "--port", busy.getsockname()[1])
        assert rc == 2 and len(err) == 1 and "cannot listen" in err[0], err
    rc, err = _cli("--model", model, "--port", free_port())
    assert rc == 2 and err[-1].startswith("error: cannot load"), err


def test_json_error_shape_is_openai():
    from tortoise_ggml.server.errors import error_body
    assert json.loads(json.dumps(error_body(429, "busy", code="queue_full"))) == {
        "error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "queue_full"}}
