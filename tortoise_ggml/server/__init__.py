"""An OpenAI-compatible speech server: ``python -m tortoise_ggml.server --model tortoise.gguf``.

    POST /v1/audio/speech   OpenAI's body (model, input, voice, response_format, speed, stream_format) plus
                            Tortoise's knobs (preset, num_autoregressive_samples, diffusion_iterations, seed, ...)
    GET  /v1/models         the one model
    GET  /v1/voices         "random", the model file's stored voices, --voices-dir folders, uploaded voices
    POST /v1/voices         multipart: name + one or more clips -> conditioning latents kept in memory
    DELETE /v1/voices/NAME  forget an uploaded voice
    GET  /health            liveness and the queue

One TextToSpeech is loaded; a single worker thread runs the jobs one at a time from a bounded queue (429 with
Retry-After when it is full). Long input is split (tortoise's split_and_recombine_text, or at '|') and each
part's audio is sent as soon as it is ready. Needs the ``server`` extra: ``pip install "tortoise-ggml[server]"``.
"""


def main(argv=None) -> int:
    from .cli import main as _main
    return _main(argv)
