"""UnifiedVoice on ggml against tortoise-tts 3.0.0's own UnifiedVoice, small config, random weights, CPU.

Tolerances (max abs error; logits and latents are O(1) here): F32 weights 1e-4 on logits, latents and conditioning
latents (measured ~1e-6); F16 KV cache 1e-2 on decode logits (measured ~1e-3); q8_0 weights 0.1 on logits
(measured ~3e-2: q8_0 quantizes the activations too).
"""
import numpy as np
import pytest

from tortoise_ggml import kernels
from tortoise_ggml.models.autoregressive import UnifiedVoice
from tortoise_ggml.weights.model_file import ModelFile

torch = pytest.importorskip("torch")

F32_TOL = 1e-4
F16_CACHE_TOL = 1e-2
Q8_TOL = 0.1
N_CODES = 20
N_STEPS = 4

COMPONENTS = ["autoregressive"]  # what the shared model_file fixture loads


@pytest.fixture(scope="module")
def uv(model_file, backend):
    return UnifiedVoice(model_file, backend)


@pytest.fixture(scope="module")
def ref(oracle, small_ckpt_dir):
    """The reference with kv_cache=True, as api.py loads it."""
    return oracle.load("autoregressive", "small", str(small_ckpt_dir))


@pytest.fixture(scope="module")
def inputs(oracle):
    inp = oracle.make_inputs("small", n_codes=N_CODES)
    return {k: inp[k] for k in ("ar_cond_latent", "text_tokens", "mel_codes")}


@pytest.fixture(scope="module")
def ref_forward(oracle, ref, inputs):
    return oracle.ar_forward(ref, inputs["ar_cond_latent"], inputs["text_tokens"], inputs["mel_codes"])


def our_forward(uv, inputs, **kw):
    t, m = inputs["text_tokens"].shape[1], inputs["mel_codes"].shape[1]
    return uv.forward(inputs["ar_cond_latent"].numpy(), inputs["text_tokens"].numpy(), [t],
                      inputs["mel_codes"].numpy(), [m * uv.mel_length_compression], clip_inputs=False, **kw)


def max_err(a, b):
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


# -- conditioning --------------------------------------------------------------------------------------------------
def test_conditioning_latent_from_mels(uv, ref):
    mels = torch.randn(2, 3, 80, 45, generator=torch.Generator().manual_seed(3))   # 2 voices, 3 clips each
    with torch.no_grad():
        expected = ref.get_conditioning(mels)
    ours = uv.get_conditioning(mels.numpy())
    assert max_err(ours, expected) <= F32_TOL
    single = uv.get_conditioning(mels[:, 0].numpy())          # (B, 80, T): one clip
    with torch.no_grad():
        assert max_err(single, ref.get_conditioning(mels[:, 0])) <= F32_TOL


# -- teacher-forced pass -------------------------------------------------------------------------------------------
def test_forward_logits_and_losses(uv, inputs, ref_forward):
    loss_text, loss_mel, mel_logits = our_forward(uv, inputs)
    assert max_err(uv.text_logits, ref_forward["text_logits"]) <= F32_TOL
    assert max_err(mel_logits, ref_forward["mel_logits"]) <= F32_TOL
    assert loss_text == pytest.approx(float(ref_forward["loss_text"]), abs=1e-4)
    assert loss_mel == pytest.approx(float(ref_forward["loss_mel"]), abs=1e-4)


def test_latents(uv, inputs, ref_forward):
    latents = our_forward(uv, inputs, return_latent=True)
    assert latents.shape == (1, N_CODES, uv.model_dim)
    assert max_err(latents, ref_forward["latents"]) <= F32_TOL


def test_forward_padded_batch(uv, ref, inputs):
    """Batch 2 with shorter second row: clip_inputs and set_mel_padding as the reference does them."""
    text = inputs["text_tokens"].repeat(2, 1)
    mel = torch.cat([inputs["mel_codes"], inputs["mel_codes"].flip(1)])
    cond = torch.cat([inputs["ar_cond_latent"], -inputs["ar_cond_latent"]])
    tl = torch.tensor([text.shape[1], text.shape[1] - 4])
    wl = torch.tensor([(N_CODES - 2) * 1024, (N_CODES - 7) * 1024])
    with torch.no_grad():
        _, _, ref_mel = ref(cond, text, tl, mel.clone(), wl)
        ref_lat = ref(cond, text, tl, mel.clone(), wl, return_latent=True)
    _, _, mel_logits = uv.forward(cond.numpy(), text.numpy(), tl.numpy(), mel.numpy(), wl.numpy())
    latents = uv.forward(cond.numpy(), text.numpy(), tl.numpy(), mel.numpy(), wl.numpy(), return_latent=True)
    assert max_err(mel_logits, ref_mel) <= F32_TOL
    assert max_err(latents, ref_lat) <= F32_TOL


def test_forward_latents_as_api_calls_it(uv, ref, inputs):
    """api.py's second pass: k rows, one text length and one wav length for all of them (the reference then pads
    only row 0 past its length; the others keep their codes)."""
    text = inputs["text_tokens"].repeat(2, 1)
    mel = torch.cat([inputs["mel_codes"], inputs["mel_codes"].flip(1)])
    cond = inputs["ar_cond_latent"].repeat(2, 1)
    tl, wl = torch.tensor([text.shape[1]]), torch.tensor([(N_CODES - 5) * 1024])
    with torch.no_grad():
        expected = ref(cond, text, tl, mel.clone(), wl, return_latent=True, clip_inputs=False)
    ours = uv.forward(cond.numpy(), text.numpy(), tl.numpy(), mel.numpy(), wl.numpy(), return_latent=True,
                      clip_inputs=False)
    assert max_err(ours, expected) <= F32_TOL


# -- KV-cache decoding ---------------------------------------------------------------------------------------------
def ref_cached_steps(oracle, ref, inputs, batch):
    """The reference's KV-cache path (HF generate with kv_cache=True): the "original" mel positions."""
    codes, _, _, logits = oracle.ar_decode_steps(ref, inputs["ar_cond_latent"], inputs["text_tokens"], batch=batch,
                                                 n_steps=N_STEPS)
    return codes.numpy(), [x.numpy() for x in logits]


def ref_uncached_steps(ref, fake_inputs, batch):
    """The reference without a cache (whole sequence each step): mel positions as in training, the "fixed" scheme.
    Row 1 is forced onto a different code at step 1 so the rows diverge."""
    im, ids = ref.inference_model, torch.from_numpy(fake_inputs).repeat(batch, 1)
    codes, logits = [], []
    with torch.no_grad():
        for step in range(N_STEPS + 1):
            out = im(input_ids=ids, attention_mask=torch.ones_like(ids), return_dict=True).logits[:, -1]
            logits.append(out.numpy())
            nxt = out.argmax(-1, keepdim=True)
            if step == 1 and batch > 1:
                nxt[1] = (nxt[1] + 1) % 8192
            codes.append(nxt[:, 0].numpy())
            ids = torch.cat([ids, nxt], 1)
    return np.stack(codes[:-1], 1), logits


def our_steps(uv, inputs, codes, mel_positions, batch):
    uv.compute_prefix(inputs["ar_cond_latent"].numpy(), inputs["text_tokens"].numpy())
    logits = [uv.inference_model.start(uv.start_mel_token, batch, N_STEPS + 2, mel_positions)]
    for k in range(N_STEPS):
        logits.append(uv.inference_model.decode(codes[:, k]))
    return logits


@pytest.mark.parametrize("fused", [True, False], ids=["attend_cache_kernel", "flash_attn"])
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_original_positions_match_reference_cache(oracle, model_file, backend, ref, inputs, batch, fused):
    """Decode steps attend with tortoise-ggml's CPU kernel where it runs, else ggml's flash attention: both."""
    uv = UnifiedVoice(model_file, backend)
    uv.inference_model.fused_attention = fused
    codes, expected = ref_cached_steps(oracle, ref, inputs, batch)
    ours = our_steps(uv, inputs, codes, "original", batch)
    step_graph = uv.inference_model._step
    assert step_graph.fused == (fused and uv.gpt.fused_attention_usable(backend, uv.inference_model.cache))
    if fused and kernels.available():
        assert step_graph.fused
    for step, (a, b) in enumerate(zip(ours, expected)):
        assert max_err(a, b) <= F32_TOL, f"step {step}"


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_fixed_positions_match_reference_without_cache(uv, ref, inputs, batch):
    fake = uv.compute_prefix(inputs["ar_cond_latent"].numpy(), inputs["text_tokens"].numpy())
    codes, expected = ref_uncached_steps(ref, fake, batch)
    ours = our_steps(uv, inputs, codes, "fixed", batch)
    for step, (a, b) in enumerate(zip(ours, expected)):
        assert max_err(a, b) <= F32_TOL, f"step {step}"
    # the two schemes must really differ, or the tests above could not tell them apart
    original = our_steps(uv, inputs, codes, "original", batch)
    assert max_err(original[1], ours[1]) > 100 * F32_TOL


def test_decode_f16_cache(model_file, backend, oracle, ref, inputs):
    uv16 = UnifiedVoice(model_file, backend, kv_cache_type="f16")
    codes, expected = ref_cached_steps(oracle, ref, inputs, 2)
    ours = our_steps(uv16, inputs, codes, "original", 2)
    errs = [max_err(a, b) for a, b in zip(ours, expected)]
    assert errs[0] <= F32_TOL            # the prefill attends to F32 keys; only later steps read the cache
    assert max(errs) <= F16_CACHE_TOL


@pytest.mark.parametrize("fused", [None, False], ids=["cpu_kernels", "plain_ggml"])
def test_q8_0_weights(small_gguf_q8, backend, inputs, ref_forward, oracle, ref, fused):
    """Through the CPU kernels (the GPT's products in kernels.q8_matmul where AVX-512 VNNI or AVX2 runs it: the
    decode steps' single positions in its row loop, the prompt's in panels) and through plain ggml ops."""
    with ModelFile(small_gguf_q8, backend, components=["autoregressive"]) as mf:
        uvq = UnifiedVoice(mf, backend, fused=fused)
        assert uvq.fused == (fused is None and kernels.usable(backend))
        _, _, mel_logits = our_forward(uvq, inputs)
        assert max_err(mel_logits, ref_forward["mel_logits"]) <= Q8_TOL
        codes, expected = ref_cached_steps(oracle, ref, inputs, 2)
        ours = our_steps(uvq, inputs, codes, "original", 2)
        assert max(max_err(a, b) for a, b in zip(ours, expected)) <= Q8_TOL


def test_inference_speech_greedy_matches_reference_generate(oracle, uv, ref, inputs):
    """The whole generate loop (helper F's sampling, repetition penalty over the fake ids) on the original scheme."""
    kw = dict(do_sample=False, repetition_penalty=2.0)
    # HF refuses greedy search with several return sequences: every one of our rows must equal its single row
    expected = oracle.ar_generate(ref, inputs["ar_cond_latent"], inputs["text_tokens"], 1, 10, **kw).numpy()
    ours = uv.inference_speech(inputs["ar_cond_latent"].numpy(), inputs["text_tokens"].numpy(),
                               num_return_sequences=3, max_generate_length=10, mel_positions="original", **kw)
    np.testing.assert_array_equal(ours, np.repeat(expected, 3, axis=0))


def test_inference_speech_sampling_shape_and_seed(uv, inputs):
    kw = dict(num_return_sequences=4, max_generate_length=6, top_p=.8, temperature=.8, repetition_penalty=2.0)
    a = uv.inference_speech(inputs["ar_cond_latent"].numpy(), inputs["text_tokens"].numpy(), rng=5, **kw)
    b = uv.inference_speech(inputs["ar_cond_latent"].numpy(), inputs["text_tokens"].numpy(), rng=5, **kw)
    assert a.shape == (4, 6) and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert ((a >= 0) & (a < uv.number_mel_codes)).all()


# -- bad input -----------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(uv, inputs):
    cond, text = inputs["ar_cond_latent"].numpy(), inputs["text_tokens"].numpy()
    with pytest.raises(ValueError, match="conditioning mels"):
        uv.get_conditioning(np.zeros((1, 2, 81, 30), np.float32))
    with pytest.raises(TypeError, match="float"):
        uv.get_conditioning(np.zeros((1, 80, 30), np.int64))
    with pytest.raises(TypeError, match="integer"):
        uv.compute_prefix(cond, text.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        uv.compute_prefix(cond, np.array([[3, 300]]))
    with pytest.raises(ValueError, match="shape"):
        uv.compute_prefix(cond[:, :10], text)
    with pytest.raises(ValueError, match="wav_lengths"):
        uv.forward(cond, text, [text.shape[1]] * 2, inputs["mel_codes"].numpy(), [1024, 1024])
    with pytest.raises(ValueError, match="mel_positions"):
        uv.inference_speech(cond, text, max_generate_length=3, mel_positions="shifted")
    with pytest.raises(ValueError, match="learned positions"):
        uv.inference_speech(cond, text, max_generate_length=uv.max_mel_tokens + 10)
    uv.compute_prefix(cond, text)
    uv.inference_model.start(uv.start_mel_token, 2, 2)
    with pytest.raises(ValueError, match="one token per row"):
        uv.inference_model.decode(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 8194\)"):
        uv.inference_model.decode(np.array([1, 9000]))
    uv.inference_model.decode(np.array([1, 2]))
    uv.inference_model.decode(np.array([1, 2]))
    with pytest.raises(RuntimeError, match="more often"):
        uv.inference_model.decode(np.array([1, 2]))
