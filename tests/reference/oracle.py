"""The reference: tortoise-tts 3.0.0's own model classes on random weights (adapted from the shared oracle harness).

Builds every model at the api.py config ('full') or a small one of the same architecture, saves checkpoints in the
release layout, loads them exactly as tortoise/api.py does, and runs each stage the way api.py calls it.
Import it after ``reference.shim.install()`` (tests/conftest.py does), since tortoise imports torchaudio.

    python tests/reference/oracle.py save --size small --out DIR
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reference import shim  # noqa: E402

shim.install()
os.environ.setdefault('REF_HOME', os.path.join(shim.cache_dir(), 'ref'))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(int(os.environ.get('ORACLE_THREADS', '2')))

from tortoise.models.autoregressive import UnifiedVoice  # noqa: E402
from tortoise.models.clvp import CLVP  # noqa: E402
from tortoise.models.cvvp import CVVP  # noqa: E402
from tortoise.models.diffusion_decoder import DiffusionTts  # noqa: E402
from tortoise.models.hifigan_decoder import HifiganGenerator  # noqa: E402
from tortoise.models.random_latent_generator import RandomLatentConverter  # noqa: E402
from tortoise.models.vocoder import UnivNetGenerator  # noqa: E402
from tortoise.utils.tokenizer import VoiceBpeTokenizer  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Configs.  'full' = exactly the constructor args used in tortoise/api.py (TextToSpeech.__init__,
# load_cvvp, get_random_conditioning_latents).  'small' = same architecture, tiny sizes.
# ----------------------------------------------------------------------------------------------------
CONFIGS = {
    'full': {
        'autoregressive': dict(max_mel_tokens=604, max_text_tokens=402, max_conditioning_inputs=2, layers=30,
                               model_dim=1024, heads=16, number_text_tokens=255, start_text_token=255,
                               checkpointing=False, train_solo_embeddings=False),
        'diffusion': dict(model_channels=1024, num_layers=10, in_channels=100, out_channels=200,
                          in_latent_channels=1024, in_tokens=8193, dropout=0, use_fp16=False, num_heads=16,
                          layer_drop=0, unconditioned_percentage=0),
        'clvp': dict(dim_text=768, dim_speech=768, dim_latent=768, num_text_tokens=256, text_enc_depth=20,
                     text_seq_len=350, text_heads=12, num_speech_tokens=8192, speech_enc_depth=20, speech_heads=12,
                     speech_seq_len=430, use_xformers=True),
        'cvvp': dict(model_dim=512, transformer_heads=8, dropout=0, mel_codes=8192, conditioning_enc_depth=8,
                     cond_mask_percentage=0, speech_enc_depth=8, speech_mask_percentage=0, latent_multiplier=1),
        # UnivNetGenerator() defaults: noise_dim=64, channel_size=32, dilations=[1,3,9,27], strides=[8,8,4]
        'vocoder': dict(),
        'rlg_auto': dict(channels=1024),
        'rlg_diffuser': dict(channels=2048),
        # tortoise/api_fast.py TextToSpeech.__init__
        'hifigan': dict(in_channels=1024, out_channels=1, resblock_type="1",
                        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], resblock_kernel_sizes=[3, 7, 11],
                        upsample_kernel_sizes=[16, 16, 4, 4], upsample_initial_channel=512,
                        upsample_factors=[8, 8, 2, 2], cond_channels=1024),
    },
    'small': {
        # size knobs: layers, model_dim, heads (model_dim % 32 == 0 for the GroupNorm32 in the conditioning encoder)
        'autoregressive': dict(max_mel_tokens=604, max_text_tokens=402, max_conditioning_inputs=2, layers=2,
                               model_dim=128, heads=4, number_text_tokens=255, start_text_token=255,
                               checkpointing=False, train_solo_embeddings=False),
        # size knobs: model_channels (%32==0, %num_heads==0), num_layers, num_heads; in_latent_channels must
        # equal the AR model_dim
        'diffusion': dict(model_channels=128, num_layers=2, in_channels=100, out_channels=200,
                          in_latent_channels=128, in_tokens=8193, dropout=0, use_fp16=False, num_heads=4,
                          layer_drop=0, unconditioned_percentage=0),
        # size knobs: dim_text/dim_speech/dim_latent, text_enc_depth/speech_enc_depth, text_heads/speech_heads
        # (x-transformers dim_head is fixed at 64, so inner attention width = 64*heads)
        'clvp': dict(dim_text=64, dim_speech=64, dim_latent=64, num_text_tokens=256, text_enc_depth=2,
                     text_seq_len=350, text_heads=2, num_speech_tokens=8192, speech_enc_depth=2, speech_heads=2,
                     speech_seq_len=430, use_xformers=True),
        'cvvp': dict(model_dim=64, transformer_heads=2, dropout=0, mel_codes=8192, conditioning_enc_depth=1,
                     cond_mask_percentage=0, speech_enc_depth=1, speech_mask_percentage=0, latent_multiplier=1),
        # size knobs: noise_dim, channel_size, dilations (LVC layers per block), strides (product must stay 256)
        'vocoder': dict(noise_dim=16, channel_size=16, dilations=[1, 3], strides=[8, 8, 4]),
        'rlg_auto': dict(channels=128),      # = AR model_dim
        'rlg_diffuser': dict(channels=256),  # = 2 * diffusion model_channels
        # size knobs: upsample_initial_channel (channels halve per upsample; 256 keeps every level a multiple of
        # 16, the fused CPU kernels' vector width); in_channels and cond_channels must equal the AR model_dim;
        # upsample factors must multiply to 256 (24 kHz from the 93.75 Hz latent frames)
        'hifigan': dict(in_channels=128, out_channels=1, resblock_type="1",
                        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], resblock_kernel_sizes=[3, 7, 11],
                        upsample_kernel_sizes=[16, 16, 4, 4], upsample_initial_channel=256,
                        upsample_factors=[8, 8, 2, 2], cond_channels=128),
    },
}

# file name in the real models dir for each component (tortoise/api.py MODELS)
FILES = {
    'autoregressive': 'autoregressive.pth',
    'diffusion': 'diffusion_decoder.pth',
    'clvp': 'clvp2.pth',
    'cvvp': 'cvvp.pth',
    'vocoder': 'vocoder.pth',
    'rlg_auto': 'rlg_auto.pth',
    'rlg_diffuser': 'rlg_diffuser.pth',
    'hifigan': 'hifidecoder.pth',  # tortoise/api_fast.py MODELS
}
SEED_OFFSET = {'autoregressive': 0, 'diffusion': 1, 'clvp': 2, 'cvvp': 3, 'vocoder': 4, 'rlg_auto': 5,
               'rlg_diffuser': 6, 'hifigan': 7}

SAMPLE_TEXT = 'Hello, this is a test of the Tortoise text to speech system. It costs $3.50 on Dec. 5th!'
# ~5 s of audio: 108 AR mel codes (22050/1024 = 21.5 codes/s) -> 108*4*24000//22050 = 470 diffusion mel frames
# -> vocoder output (470)*256 = 120320 samples at 24 kHz = 5.01 s
N_CODES_5S = 108


def default_ckpt_dir(size):
    return os.path.join(os.environ['REF_HOME'], f'ckpt_{size}')


# ----------------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------------
def construct(name, size):
    cfg = CONFIGS[size][name]
    if name == 'autoregressive':
        return UnifiedVoice(**cfg).cpu().eval()
    if name == 'diffusion':
        return DiffusionTts(**cfg).cpu().eval()
    if name == 'clvp':
        return CLVP(**cfg).cpu().eval()
    if name == 'cvvp':
        return CVVP(**cfg).cpu().eval()
    if name == 'vocoder':
        return UnivNetGenerator(**cfg).cpu()
    if name in ('rlg_auto', 'rlg_diffuser'):
        return RandomLatentConverter(cfg['channels']).eval()
    if name == 'hifigan':
        return construct_hifigan(cfg)
    raise KeyError(name)


def construct_hifigan(cfg):
    """HifiganGenerator(**cfg) (its weight_norm calls warn that weight_norm is deprecated: silenced)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        return HifiganGenerator(**cfg).eval()


@torch.no_grad()
def perturb_degenerate(model, gen):
    """Make every weight matter.  Tortoise zero-initialises several layers (AttentionBlock.proj_out,
    ResBlock out convs (zero_module), x-transformers gates) and norms start at 1/0; with those values
    whole blocks are identities, so a port that dropped them would still match.  Replace every constant
    parameter tensor (all elements equal) with random values:
      * >=2-D weights  -> N(0, 1/fan_in)  (fan_in = numel/shape[0])
      * 1-D tensors whose constant is 1 (norm gains) -> 1 + N(0, 0.1^2)
      * other 1-D/0-D tensors with >1 element (biases) -> N(0, 0.02^2)  (scalars, e.g. CLVP temperature, kept)
    """
    for _, p in model.named_parameters():
        if p.numel() <= 1:
            continue
        flat = p.detach().reshape(-1)
        if not bool((flat == flat[0]).all()):
            continue
        c = float(flat[0])
        if p.dim() >= 2:
            fan_in = p.numel() // p.shape[0]
            p.copy_(torch.randn(p.shape, generator=gen) / (fan_in ** 0.5))
        elif c == 1.0:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(c + 0.02 * torch.randn(p.shape, generator=gen))


def build(name, size, seed=0, perturb=True):
    torch.manual_seed(seed * 100 + SEED_OFFSET[name])
    m = construct(name, size)
    if perturb:
        gen = torch.Generator().manual_seed(seed * 100 + SEED_OFFSET[name] + 50)
        perturb_degenerate(m, gen)
    return m


def add_legacy_gpt2_buffers(sd, ar):
    """transformers<4.31 saved GPT2Attention's causal-mask buffers; 4.31 made them non-persistent.  The
    released autoregressive.pth (~1.72 GB, vs 1.686 GB without them) evidently carries
    gpt.h.{i}.attn.bias (bool tril [1,1,1012,1012]) and gpt.h.{i}.attn.masked_bias (-1e4); api.py loads it
    with strict=False, so these keys are ignored.  We add them so a loader sees the same key set (inferred
    from the file size, not verified against the real file)."""
    n = ar.gpt.config.n_positions
    new = {}
    for k, v in sd.items():
        new[k] = v
        parts = k.split('.')
        if len(parts) == 5 and parts[0] == 'gpt' and parts[1] == 'h' and parts[3] == 'ln_1' and parts[4] == 'bias':
            i = parts[2]
            new[f'gpt.h.{i}.attn.bias'] = torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n)
            new[f'gpt.h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
    return type(sd)(new)


def save_all(size, out=None, seed=0, perturb=True, names=None, legacy_gpt2_buffers=True):
    out = out or default_ckpt_dir(size)
    os.makedirs(out, exist_ok=True)
    names = names or list(FILES)
    for name in names:
        t0 = time.time()
        m = build(name, size, seed, perturb)
        sd = m.state_dict()
        if name == 'autoregressive' and legacy_gpt2_buffers:
            sd = add_legacy_gpt2_buffers(sd, m)
        obj = {'model_g': sd} if name == 'vocoder' else sd   # api.py: torch.load(vocoder.pth)['model_g']
        torch.save(obj, os.path.join(out, FILES[name]))
        print(f'saved {FILES[name]:24s} {len(sd):5d} tensors {sum(v.numel() for v in sd.values()):>12,d} elems '
              f'{os.path.getsize(os.path.join(out, FILES[name])):>14,d} bytes '
              f'({time.time() - t0:.1f}s)', flush=True)
        del m, sd, obj
    with open(os.path.join(out, 'config.json'), 'w') as f:
        json.dump({'size': size, 'seed': seed, 'perturb': perturb, 'legacy_gpt2_buffers': legacy_gpt2_buffers,
                   'configs': CONFIGS[size], 'files': FILES,
                   'tortoise_tts': '3.0.0', 'torch': torch.__version__}, f, indent=1)
    return out


# ----------------------------------------------------------------------------------------------------
# Loading exactly like tortoise/api.py TextToSpeech.__init__ (+ load_cvvp, get_random_conditioning_latents)
# ----------------------------------------------------------------------------------------------------
def load(name, size, ckpt=None, kv_cache=True):
    ckpt = ckpt or default_ckpt_dir(size)
    path = os.path.join(ckpt, FILES[name])
    m = construct(name, size)
    if name == 'autoregressive':
        m.load_state_dict(torch.load(path), strict=False)
        m.post_init_gpt2_config(use_deepspeed=False, kv_cache=kv_cache, half=False)
    elif name == 'vocoder':
        m.load_state_dict(torch.load(path, map_location=torch.device('cpu'))['model_g'])
        m.eval(inference=True)  # removes weight norm
    elif name in ('rlg_auto', 'rlg_diffuser'):
        m.load_state_dict(torch.load(path, map_location=torch.device('cpu')))
    elif name == 'hifigan':
        load_hifigan(m, path)
    else:
        m.load_state_dict(torch.load(path))
    return m


def load_hifigan(m, path):
    """As api_fast.py: load_state_dict(strict=False), then fold weight norm (HifiganGenerator.remove_weight_norm,
    quietly: it prints). api_fast keeps weight norm, which recomputes the same g * v / |v| every forward; folding it
    once is what the converter stores, so the folded weights are what both sides compute with."""
    import contextlib
    import io
    missing, unexpected = m.load_state_dict(torch.load(path, map_location=torch.device('cpu')), strict=False)
    assert not missing and not unexpected, (missing, unexpected)  # strict=False would hide a broken file
    with contextlib.redirect_stdout(io.StringIO()):
        m.remove_weight_norm()
    return m


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------
_TOK = None


def tokenizer():
    global _TOK
    if _TOK is None:
        _TOK = VoiceBpeTokenizer()  # tortoise/data/tokenizer.json shipped in the wheel
    return _TOK


def text_tokens_for(text=SAMPLE_TEXT):
    """(f) exactly as TextToSpeech.tts: IntTensor(encode(text)).unsqueeze(0), then F.pad(.., (0, 1))."""
    t = torch.IntTensor(tokenizer().encode(text)).unsqueeze(0)
    return F.pad(t, (0, 1))


def make_inputs(size, n_codes=N_CODES_5S, seed=1234):
    g = torch.Generator().manual_seed(seed)
    cfg = CONFIGS[size]
    d_ar = cfg['autoregressive']['model_dim']
    d_cond = 2 * cfg['diffusion']['model_channels']
    inp = {}
    inp['text_tokens'] = text_tokens_for()                                        # (1, T) int32
    inp['ar_cond_latent'] = torch.randn(1, d_ar, generator=g)                    # (1, 1024)
    inp['mel_codes'] = torch.randint(0, 8192, (1, n_codes), generator=g)         # (1, 108) int64
    inp['diff_cond_latent'] = torch.randn(1, d_cond, generator=g)                # (1, 2048)
    out_len = n_codes * 4 * 24000 // 22050                                        # 470
    inp['diff_x'] = torch.randn(1, 100, out_len, generator=g)                     # (1, 100, 470)
    inp['diff_t'] = torch.tensor([500])                                          # timestep (4000-step scale)
    inp['voc_mel'] = torch.randn(1, 100, out_len, generator=g) - 5.0             # (1, 100, 470) log-mel-like
    inp['voc_z'] = torch.randn(1, cfg['vocoder'].get('noise_dim', 64), out_len + 10, generator=g)
    inp['clvp_codes'] = torch.randint(0, 8192, (16, 500), generator=g)           # api pads AR codes to 500
    inp['cond_wavs'] = 0.1 * torch.randn(2, 132300, generator=g)                 # 2 voice clips, 6 s @22.05k
    inp['diff_cond_wavs'] = 0.1 * torch.randn(2, 102400, generator=g)            # 2 clips @24k (api pads to 102400)
    return inp


# ----------------------------------------------------------------------------------------------------
# (a) AR forward
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def ar_forward(ar, cond_latent, text_tokens, mel_codes):
    """UnifiedVoice.forward the way api.py calls it for best_latents (clip_inputs=False,
    text_lengths=[T], wav_lengths=[M*1024]).  Returns
      text_logits (b, 256, T+2), mel_logits (b, 8194, M+2)  [from forward(return_latent=False)]
      latents (b, M, d)                                        [from forward(return_latent=True)]
      loss_text, loss_mel
    text_logits are captured by wrapping UnifiedVoice.get_logits (model code unchanged)."""
    b = mel_codes.shape[0]
    cond = cond_latent.repeat(b, 1) if cond_latent.shape[0] != b else cond_latent
    text = text_tokens.repeat(b, 1) if text_tokens.shape[0] != b else text_tokens
    tl = torch.tensor([text.shape[-1]])
    wl = torch.tensor([mel_codes.shape[-1] * ar.mel_length_compression])
    latents = ar(cond, text, tl, mel_codes.clone(), wl, return_latent=True, clip_inputs=False)
    captured = {}
    orig = ar.get_logits

    def wrapped(*a, **k):
        r = orig(*a, **k)
        captured['r'] = r
        return r
    ar.get_logits = wrapped
    try:
        loss_text, loss_mel, mel_logits = ar(cond, text, tl, mel_codes.clone(), wl, clip_inputs=False)
    finally:
        del ar.get_logits
    text_logits, mel_logits2 = captured['r']
    assert torch.equal(mel_logits, mel_logits2)
    return dict(text_logits=text_logits, mel_logits=mel_logits, latents=latents, loss_text=loss_text,
                loss_mel=loss_mel)


@torch.no_grad()
def ar_conditioning(ar, wavs):
    """AR conditioning latent from 22.05 kHz clips, as TextToSpeech.get_conditioning_latents
    (format_conditioning -> TorchMelSpectrogram (torchaudio shim) -> get_conditioning)."""
    from tortoise.api import format_conditioning
    conds = torch.stack([format_conditioning(w.unsqueeze(0), device='cpu') for w in wavs], dim=1)
    return ar.get_conditioning(conds), conds


@torch.no_grad()
def diffusion_conditioning(diff, wavs24k):
    """Diffusion conditioning latent from 24 kHz clips padded/truncated to 102400 samples
    (wav_to_univnet_mel, librosa mel basis) as TextToSpeech.get_conditioning_latents."""
    from tortoise.api import pad_or_truncate
    from tortoise.utils.audio import wav_to_univnet_mel
    mels = [wav_to_univnet_mel(pad_or_truncate(w.unsqueeze(0), 102400), do_normalization=False, device='cpu')
            for w in wavs24k]
    conds = torch.stack(mels, dim=1)
    return diff.get_conditioning(conds), conds


# ----------------------------------------------------------------------------------------------------
# (b) AR incremental decode with KV cache
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def ar_prefix(ar, cond_latent, text_tokens):
    """Same as UnifiedVoice.inference_speech up to generate(): stores the (cond, text) prefix embedding in
    the GPT2InferenceModel and returns the fake input_ids (…,1,1,start_mel) that HF generate starts from."""
    text_inputs = F.pad(text_tokens, (0, 1), value=ar.stop_text_token)
    text_inputs, _ = ar.build_aligned_inputs_and_targets(text_inputs, ar.start_text_token, ar.stop_text_token)
    text_emb = ar.text_embedding(text_inputs) + ar.text_pos_embedding(text_inputs)
    conds = cond_latent.unsqueeze(1)
    emb = torch.cat([conds, text_emb], dim=1)
    ar.inference_model.store_mel_emb(emb)
    fake = torch.full((emb.shape[0], conds.shape[1] + emb.shape[1]), fill_value=1, dtype=torch.long)
    fake[:, -1] = ar.start_mel_token
    return fake


@torch.no_grad()
def ar_decode_steps(ar, cond_latent, text_tokens, batch=1, prefill_codes=None, n_steps=4, greedy=True):
    """Prefill (cond+text+start_mel [+ prefill_codes]) then n_steps single-token steps through
    ar.inference_model with past_key_values, mimicking HF generate's prepare_inputs_for_generation
    (attention_mask of ones, position ids are unused because wpe is a null embedding).
    Prefill is done at batch 1 and the cache replicated to `batch` rows.
    Returns (codes (batch, n_steps), per-step wall seconds list, batch-1 prefill seconds, step logits list)."""
    im = ar.inference_model
    fake = ar_prefix(ar, cond_latent, text_tokens)
    inputs = fake
    if prefill_codes is not None:
        inputs = torch.cat([inputs, prefill_codes[:1]], dim=1)
    am = torch.ones_like(inputs)
    t0 = time.perf_counter()
    out = im(input_ids=inputs, attention_mask=am, use_cache=True, return_dict=True)
    t_prefill = time.perf_counter() - t0
    # prefill once at batch 1, then replicate the KV cache (HF generate would prefill all rows; same result)
    past = tuple(tuple(t.repeat(batch, 1, 1, 1) for t in layer) for layer in out.past_key_values)
    am = am.repeat(batch, 1)
    logits = out.logits[:, -1].repeat(batch, 1)
    codes, times, all_logits = [], [], [logits]
    for _ in range(n_steps):
        nxt = logits.argmax(-1, keepdim=True) if greedy else torch.multinomial(logits.softmax(-1), 1)
        codes.append(nxt)
        am = torch.cat([am, torch.ones_like(nxt)], dim=1)
        t0 = time.perf_counter()
        out = im(input_ids=nxt, past_key_values=past, attention_mask=am, use_cache=True, return_dict=True)
        times.append(time.perf_counter() - t0)
        past = out.past_key_values
        logits = out.logits[:, -1]
        all_logits.append(logits)
    return torch.cat(codes, dim=1), times, t_prefill, all_logits


@torch.no_grad()
def ar_generate(ar, cond_latent, text_tokens, num_return_sequences=1, max_generate_length=8, **kw):
    """UnifiedVoice.inference_speech with the api.py sampling knobs (tts() defaults)."""
    args = dict(do_sample=True, top_p=.8, temperature=.8, length_penalty=1.0, repetition_penalty=2.0)
    args.update(kw)
    return ar.inference_speech(cond_latent, text_tokens, num_return_sequences=num_return_sequences,
                               max_generate_length=max_generate_length, **args)


# ----------------------------------------------------------------------------------------------------
# (c) diffusion, (d) vocoder, (e) CLVP
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def diffusion_precompute(diff, latents, cond_latent):
    out_len = latents.shape[1] * 4 * 24000 // 22050
    return diff.timestep_independent(latents, cond_latent, out_len, False)


@torch.no_grad()
def diffusion_step(diff, x, t, precomputed, conditioning_free=False):
    """One DiffusionTts.forward at one timestep (what p_sample_loop calls; with cond_free=True api.py
    calls it twice per step: once normal and once with conditioning_free=True).  Out: (b, 200, L)."""
    return diff(x, t, precomputed_aligned_embeddings=precomputed, conditioning_free=conditioning_free)


@torch.no_grad()
def diffusion_sample(diff, latents, cond_latent, steps=4, cond_free=True, seed=0):
    """Full tortoise.api.do_spectrogram_diffusion with `steps` spaced steps (use small configs)."""
    from tortoise.api import do_spectrogram_diffusion, load_discrete_vocoder_diffuser
    diffuser = load_discrete_vocoder_diffuser(desired_diffusion_steps=steps, cond_free=cond_free, cond_free_k=2)
    torch.manual_seed(seed)
    return do_spectrogram_diffusion(diff, diffuser, latents, cond_latent, temperature=1.0, verbose=False)


@torch.no_grad()
def vocoder_run(voc, mel, z=None):
    """UnivNetGenerator.inference (pads 10 frames of -11.5129, trims 2560 samples, clamps to [-1,1])."""
    return voc.inference(mel, z)


@torch.no_grad()
def hifigan_inference(hifi, latents, voice_latent):
    """HifiganGenerator.inference(c, g) on CPU: its two linear interpolations (x 1024/256, then x 24000/22050) and
    forward with g = voice_latent.unsqueeze(0).transpose(1, 2), as the reference (which moves x to "cuda"
    unconditionally, so it cannot be called as is here). latents (1, T, D), voice_latent (1, cond) -> (1, 1, S)."""
    up_1 = F.interpolate(latents.transpose(1, 2), scale_factor=[1024 / 256], mode="linear")
    up_2 = F.interpolate(up_1, scale_factor=[24000 / 22050], mode="linear")
    g = voice_latent.unsqueeze(0)
    return hifi.forward(up_2, g.transpose(1, 2))


def handle_chunks(wav_gen, wav_gen_prev, wav_overlap, overlap_len):
    """tortoise/api_fast.py TextToSpeech.handle_chunks (it uses no state of the instance)."""
    from tortoise.api_fast import TextToSpeech as FastTextToSpeech
    return FastTextToSpeech.handle_chunks(None, wav_gen, wav_gen_prev, wav_overlap, overlap_len)


@torch.no_grad()
def clvp_scores(clvp, text_tokens, codes):
    """CLVP scores of candidates, as api.py: clvp(text_tokens.repeat(b,1), codes, return_loss=False)."""
    return clvp(text_tokens.repeat(codes.shape[0], 1), codes, return_loss=False)


# ----------------------------------------------------------------------------------------------------
# Reference dump
# ----------------------------------------------------------------------------------------------------
def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@torch.no_grad()
def dump(size, ckpt=None, out=None, n_codes=N_CODES_5S):
    ckpt = ckpt or default_ckpt_dir(size)
    out = out or os.path.join(os.environ['REF_HOME'], f'refs_{size}.npz')
    inp = make_inputs(size, n_codes)
    res = {f'in_{k}': _np(v) for k, v in inp.items()}
    res['in_text'] = np.array(SAMPLE_TEXT)
    # (f)
    res['tok_ids'] = np.array(tokenizer().encode(SAMPLE_TEXT), dtype=np.int64)
    res['tok_normalized'] = np.array(tokenizer().decode(res['tok_ids'].tolist()))
    # (a) + conditioning + (b) greedy decode
    ar = load('autoregressive', size, ckpt)
    r = ar_forward(ar, inp['ar_cond_latent'], inp['text_tokens'], inp['mel_codes'])
    for k, v in r.items():
        res[f'ar_{k}'] = _np(v)
    lat, mels = ar_conditioning(ar, inp['cond_wavs'])
    res['ar_cond_mels'], res['ar_cond_from_wavs'] = _np(mels), _np(lat)
    codes, _, _, step_logits = ar_decode_steps(ar, inp['ar_cond_latent'], inp['text_tokens'], batch=1, n_steps=8)
    res['ar_greedy_codes'] = _np(codes)
    res['ar_greedy_step_logits'] = _np(torch.stack(step_logits, 1))  # (1, 9, 8194): logits before each pick
    ar_latents = r['latents']
    del ar
    # (c)
    diff = load('diffusion', size, ckpt)
    lat_in = ar_latents if ar_latents.shape[-1] == CONFIGS[size]['diffusion']['in_latent_channels'] else None
    res['diff_latents_in'] = _np(lat_in)
    pre = diffusion_precompute(diff, lat_in, inp['diff_cond_latent'])
    res['diff_precomputed'] = _np(pre)
    res['diff_out'] = _np(diffusion_step(diff, inp['diff_x'], inp['diff_t'], pre))
    res['diff_out_cond_free'] = _np(diffusion_step(diff, inp['diff_x'], inp['diff_t'], pre, conditioning_free=True))
    dl, dm = diffusion_conditioning(diff, inp['diff_cond_wavs'])
    res['diff_cond_mels'], res['diff_cond_from_wavs'] = _np(dm), _np(dl)
    if size == 'small':
        res['diff_sample_4steps'] = _np(diffusion_sample(diff, lat_in, inp['diff_cond_latent'], steps=4))
    del diff
    # (d)
    voc = load('vocoder', size, ckpt)
    res['voc_wav'] = _np(vocoder_run(voc, inp['voc_mel'], inp['voc_z']))
    del voc
    # (e)
    clvp = load('clvp', size, ckpt)
    res['clvp_scores'] = _np(clvp_scores(clvp, inp['text_tokens'], inp['clvp_codes']))
    del clvp
    # RLGs (forward draws torch.randn internally -> seeded)
    for name in ('rlg_auto', 'rlg_diffuser'):
        m = load(name, size, ckpt)
        torch.manual_seed(7)
        res[f'{name}_out'] = _np(m(torch.tensor([0.0])))
    np.savez(out, **{k: v for k, v in res.items() if v is not None and v.dtype != object})
    print(f'wrote {out}')
    for k, v in res.items():
        if v is not None and v.dtype != object:
            print(f'  {k:26s} {str(v.dtype):8s} {tuple(v.shape)}')
    return out


# ----------------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------------
def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timeit(fn, iters, warmup=1, slow_s=3.0):
    """Time fn.  Keeps compute modest on 2 cores: the first call is timed too; if it took > slow_s it is
    reported alone (n=1, includes any first-call overhead), else warm-up + `iters` timed calls."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > slow_s:
        return [first]
    for _ in range(warmup - 1):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def _stats(ts):
    return {'mean_s': float(np.mean(ts)), 'min_s': float(np.min(ts)), 'n': len(ts)}


@torch.no_grad()
def bench(part, size, ckpt=None, iters=3):
    ckpt = ckpt or default_ckpt_dir(size)
    inp = make_inputs(size)
    R = {'part': part, 'size': size, 'threads': torch.get_num_threads(), 'torch': torch.__version__}
    t0 = time.perf_counter()
    if part == 'tokenizer':
        R['ids_len'] = len(tokenizer().encode(SAMPLE_TEXT))
        R['encode'] = _stats(_timeit(lambda: tokenizer().encode(SAMPLE_TEXT), 20))
    elif part == 'ar':
        ar = load('autoregressive', size, ckpt)
        R['load_s'] = time.perf_counter() - t0
        T = inp['text_tokens'].shape[1]
        R['text_len_T'] = T
        R['prefix_len'] = T + 2 + 1 + 1
        # (a) full forward (teacher forcing) at 5 s: T text + 108 codes, batch 1
        R['forward_b1'] = _stats(_timeit(lambda: ar_forward(ar, inp['ar_cond_latent'], inp['text_tokens'],
                                                            inp['mel_codes']), 1, warmup=1))
        # (b) incremental steps with KV cache
        for b in (1, 16):
            for ctx_codes in (0, N_CODES_5S):
                pre = inp['mel_codes'][:, :ctx_codes] if ctx_codes else None
                ar_decode_steps(ar, inp['ar_cond_latent'], inp['text_tokens'], batch=b, prefill_codes=pre,
                                n_steps=1)  # warmup
                _, ts, tp, _ = ar_decode_steps(ar, inp['ar_cond_latent'], inp['text_tokens'], batch=b,
                                               prefill_codes=pre, n_steps=iters + 2)
                R[f'step_b{b}_ctx{R["prefix_len"] + ctx_codes}'] = _stats(ts[1:])
                R[f'prefill_b1_len{R["prefix_len"] + ctx_codes}_s'] = tp
        # HF generate (api.py sampling knobs: top_p .8, temperature .8, repetition_penalty 2.0) per-token cost,
        # timed between successive StoppingCriteria calls (one per generated token, after token selection)
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _StepTimer(StoppingCriteria):
            def __init__(self):
                self.ts = []

            def __call__(self, input_ids, scores, **kw):
                self.ts.append(time.perf_counter())
                return False
        for b in (1, 16):
            torch.manual_seed(0)
            timer = _StepTimer()
            t1 = time.perf_counter()
            g = ar_generate(ar, inp['ar_cond_latent'], inp['text_tokens'], b, 2 + iters + 1,
                            stopping_criteria=StoppingCriteriaList([timer]))
            R[f'generate_b{b}_first_token_s'] = timer.ts[0] - t1   # HF prefill of all b rows + 1st sample
            R[f'generate_b{b}_per_token'] = _stats(list(np.diff(timer.ts)[1:]))
            R[f'generate_b{b}_tokens'] = int(g.shape[1])
    elif part == 'diffusion':
        diff = load('diffusion', size, ckpt)
        R['load_s'] = time.perf_counter() - t0
        d_lat = CONFIGS[size]['diffusion']['in_latent_channels']
        lat = torch.randn(1, N_CODES_5S, d_lat)
        R['shapes'] = {'x': list(inp['diff_x'].shape), 'latents': list(lat.shape),
                       'cond_latent': list(inp['diff_cond_latent'].shape)}
        R['timestep_independent'] = _stats(_timeit(lambda: diffusion_precompute(diff, lat, inp['diff_cond_latent']),
                                                   iters))
        pre = diffusion_precompute(diff, lat, inp['diff_cond_latent'])
        R['step_cond'] = _stats(_timeit(lambda: diffusion_step(diff, inp['diff_x'], inp['diff_t'], pre), iters))
        R['step_cond_free'] = _stats(_timeit(lambda: diffusion_step(diff, inp['diff_x'], inp['diff_t'], pre, True),
                                             iters))
    elif part == 'vocoder':
        voc = load('vocoder', size, ckpt)
        R['load_s'] = time.perf_counter() - t0
        R['mel_shape'] = list(inp['voc_mel'].shape)
        R['wav_len'] = int(vocoder_run(voc, inp['voc_mel']).shape[-1])
        R['inference'] = _stats(_timeit(lambda: vocoder_run(voc, inp['voc_mel']), iters))
    elif part == 'clvp':
        clvp = load('clvp', size, ckpt)
        R['load_s'] = time.perf_counter() - t0
        R['text_shape'] = [16, inp['text_tokens'].shape[1]]
        R['score16_len500'] = _stats(_timeit(lambda: clvp_scores(clvp, inp['text_tokens'], inp['clvp_codes']), iters))
        c108 = inp['clvp_codes'][:, :N_CODES_5S]
        R['score16_len108'] = _stats(_timeit(lambda: clvp_scores(clvp, inp['text_tokens'], c108), iters))
    else:
        raise KeyError(part)
    R['peak_rss_mb'] = peak_rss_mb()
    R['total_s'] = time.perf_counter() - t0
    return R


def param_counts(size):
    out = {}
    for name in FILES:
        m = construct(name, size)
        n_sd = sum(v.numel() for v in m.state_dict().values())
        n_p = sum(p.numel() for p in m.parameters())
        e = {'parameters': n_p, 'state_dict_elems': n_sd}
        if name == 'vocoder':
            m.eval(inference=True)
            e['parameters_after_remove_weight_norm'] = sum(p.numel() for p in m.parameters())
        if name == 'autoregressive':
            e['gpt2_transformer_parameters'] = sum(p.numel() for p in m.gpt.parameters())
        out[name] = e
        del m
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('cmd', choices=['save', 'dump', 'bench', 'benchall', 'params'])
    ap.add_argument('--size', default='small', choices=['full', 'small'])
    ap.add_argument('--ckpt', default=None)
    ap.add_argument('--out', default=None)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--no-perturb', action='store_true')
    ap.add_argument('--no-legacy-gpt2-buffers', action='store_true')
    ap.add_argument('--part', default='ar')
    ap.add_argument('--iters', type=int, default=3)
    a = ap.parse_args()
    if a.cmd == 'save':
        save_all(a.size, a.out or a.ckpt, a.seed, not a.no_perturb,
                 legacy_gpt2_buffers=not a.no_legacy_gpt2_buffers)
    elif a.cmd == 'dump':
        dump(a.size, a.ckpt, a.out)
    elif a.cmd == 'bench':
        print(json.dumps(bench(a.part, a.size, a.ckpt, a.iters)), flush=True)
    elif a.cmd == 'params':
        print(json.dumps(param_counts(a.size), indent=1))
    elif a.cmd == 'benchall':
        results = []
        for part in ['tokenizer', 'vocoder', 'clvp', 'diffusion', 'ar']:
            cmd = [sys.executable, os.path.abspath(__file__), 'bench', '--part', part, '--size', a.size,
                   '--iters', str(a.iters)] + (['--ckpt', a.ckpt] if a.ckpt else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith('{')]
            if p.returncode != 0 or not line:
                print(p.stderr[-3000:], file=sys.stderr)
                results.append({'part': part, 'error': p.stderr[-2000:]})
            else:
                results.append(json.loads(line[-1]))
            print(json.dumps(results[-1]), flush=True)
        out = a.out or os.path.join(os.environ['REF_HOME'], f'timings_{a.size}.json')
        with open(out, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
