"""What a Tortoise checkpoint must contain: per component, its hyperparameters derived from tensor shapes and the
exact key -> shape table those hyperparameters imply.

Works on ``{key: shape}`` alone (no torch, no tortoise-tts), so the converter validates a checkpoint before writing
anything, and tests can check the tables against the reference classes built on torch's meta device. The tables
mirror the module trees of tortoise-tts 3.0.0 (tortoise/models/*.py); keys are the state-dict keys after weight norm
is folded (``x.weight_g`` + ``x.weight_v`` -> ``x.weight``).

Hyperparameters are named after the tortoise constructor arguments. The few that shapes cannot show (attention
heads, UnivNet dilations, ...) come from the component's entry in a ``config.json`` beside the checkpoints when it
has one, else from the values tortoise/api.py uses.
"""
from __future__ import annotations

import math
import re

Shape = tuple[int, ...]


class CheckpointError(ValueError):
    """A checkpoint that does not match its component's architecture; the message names the file and key."""


# ------------------------------------------------------------------------------------------------------------------
# Reading shapes
# ------------------------------------------------------------------------------------------------------------------
class Shapes:
    """The checkpoint's shapes, with lookups whose errors name the file and the key."""

    def __init__(self, shapes: dict[str, Shape], source: str, component: str):
        self.shapes = shapes
        self.source = source
        self.component = component

    def __call__(self, key: str, ndim: int | None = None) -> Shape:
        try:
            shape = self.shapes[key]
        except KeyError:
            raise CheckpointError(f"{self.source}: missing key {key!r} ({self.component})") from None
        if ndim is not None and len(shape) != ndim:
            raise CheckpointError(f"{self.source}: key {key!r} has shape {shape}, expected {ndim} dimensions")
        return shape

    def count(self, pattern: str) -> int:
        """1 + the largest N over keys matching ``pattern`` (a regex with one group: the index N), or 0."""
        rx = re.compile(pattern)
        found = [int(m.group(1)) for k in self.shapes if (m := rx.match(k))]
        return max(found) + 1 if found else 0


def _settle(hp: dict, derivable: dict, config: dict, source: str, component: str) -> dict:
    """Merge derived values into ``hp``; a config.json value for a derived one must agree with the shapes."""
    for name, value in derivable.items():
        if name in config and config[name] != value:
            raise CheckpointError(f"{source}: config.json gives {component} {name}={config[name]!r} but the "
                                  f"checkpoint's shapes give {value!r}")
        hp[name] = value
    return hp


def _divides(source: str, what: str, whole: int, part: int) -> None:
    if part <= 0 or whole % part:
        raise CheckpointError(f"{source}: {what}: {whole} is not divisible by {part}")


# ------------------------------------------------------------------------------------------------------------------
# Shared blocks (tortoise/models/arch_util.py, xtransformers.py)
# ------------------------------------------------------------------------------------------------------------------
def _linear(out: dict, prefix: str, n_in: int, n_out: int, bias: bool = True) -> None:
    out[f"{prefix}.weight"] = (n_out, n_in)
    if bias:
        out[f"{prefix}.bias"] = (n_out,)


def _conv(out: dict, prefix: str, n_in: int, n_out: int, k: int) -> None:
    out[f"{prefix}.weight"] = (n_out, n_in, k)
    out[f"{prefix}.bias"] = (n_out,)


def _norm(out: dict, prefix: str, n: int) -> None:
    out[f"{prefix}.weight"] = (n,)
    out[f"{prefix}.bias"] = (n,)


def _attention_block(out: dict, prefix: str, channels: int, heads: int | None = None, buckets: int = 32) -> None:
    """arch_util.AttentionBlock; ``heads`` given when it has relative position embeddings."""
    _norm(out, f"{prefix}.norm", channels)
    _conv(out, f"{prefix}.qkv", channels, 3 * channels, 1)
    _conv(out, f"{prefix}.proj_out", channels, channels, 1)
    if heads is not None:
        out[f"{prefix}.relative_pos_embeddings.relative_attention_bias.weight"] = (buckets, heads)


def _x_encoder(out: dict, prefix: str, dim: int, depth: int, inner: int, ff_inner: int, rotary_half: int,
               wrap: str) -> None:
    """xtransformers.Encoder (pre-RMSNorm, attention then GEGLU feed-forward per depth step) inside a wrapper with a
    final LayerNorm: CLVP's CheckpointedXTransformerEncoder (``wrap=".wrap"``) or CVVP's
    ContinuousTransformerWrapper."""
    layers = f"{prefix}.attn_layers.layers"
    for i in range(depth):
        a, f = 2 * i, 2 * i + 1
        out[f"{layers}.{a}.0.0.g"] = (dim,)
        for q in ("to_q", "to_k", "to_v"):
            out[f"{layers}.{a}.1{wrap}.{q}.weight"] = (inner, dim)
        _linear(out, f"{layers}.{a}.1{wrap}.to_out", inner, dim)
        out[f"{layers}.{f}.0.0.g"] = (dim,)
        _linear(out, f"{layers}.{f}.1{wrap}.net.0.proj", dim, 2 * ff_inner)
        _linear(out, f"{layers}.{f}.1{wrap}.net.3", ff_inner, dim)
    out[f"{prefix}.attn_layers.rotary_pos_emb.inv_freq"] = (rotary_half,)
    _norm(out, f"{prefix}.norm", dim)


def _x_encoder_hparams(s: Shapes, prefix: str, wrap: str) -> dict:
    layers = f"{prefix}.attn_layers.layers"
    n = s.count(rf"{re.escape(layers)}\.(\d+)\.")
    if n == 0 or n % 2:
        raise CheckpointError(f"{s.source}: {prefix} has {n} attention-layer entries; an x-transformers Encoder has "
                              f"an attention and a feed-forward entry per depth step (missing key "
                              f"{layers}.{n}.0.0.g?)")
    inner, dim = s(f"{layers}.0.1{wrap}.to_q.weight", 2)
    ff_inner = s(f"{layers}.1.1{wrap}.net.3.weight", 2)[1]
    return {"depth": n // 2, "dim": dim, "inner": inner, "ff_inner": ff_inner,
            "rotary_half": s(f"{prefix}.attn_layers.rotary_pos_emb.inv_freq", 1)[0]}


# ------------------------------------------------------------------------------------------------------------------
# autoregressive: tortoise/models/autoregressive.py UnifiedVoice (+ HF GPT-2)
# ------------------------------------------------------------------------------------------------------------------
def autoregressive_hparams(s: Shapes, config: dict) -> dict:
    n_text, d = s("text_embedding.weight", 2)
    n_mel = s("mel_embedding.weight", 2)[0]
    mel_pos = s("mel_pos_embedding.emb.weight", 2)[0]
    # mel positions = max_mel_tokens + 2 + max_conditioning_inputs: only the sum shows, api.py uses 2 inputs
    max_cond = int(config.get("max_conditioning_inputs", 2))
    types = int(config.get("types", 1))
    _divides(s.source, "text_embedding rows - 1 = number_text_tokens * types", n_text - 1, types)
    number_text_tokens = (n_text - 1) // types
    heads = int(config.get("heads", d // 64))
    _divides(s.source, "model_dim / heads", d, heads)
    hp = {
        "heads": heads,
        "max_conditioning_inputs": max_cond,
        "types": types,
        "start_text_token": int(config.get("start_text_token", None) or number_text_tokens * types),
        "stop_text_token": 0,  # fixed in UnifiedVoice.__init__
        "start_mel_token": int(config.get("start_mel_token", n_mel - 2)),
        "stop_mel_token": int(config.get("stop_mel_token", n_mel - 1)),
        "mel_length_compression": int(config.get("mel_length_compression", 1024)),
        "layer_norm_epsilon": 1e-5,  # GPT2Config default, also nn.LayerNorm's (final_norm)
        "conditioning_num_attn_heads": heads,  # ConditioningEncoder(80, model_dim, num_attn_heads=heads)
    }
    layers = s.count(r"gpt\.h\.(\d+)\.")
    if layers == 0:
        s("gpt.h.0.ln_1.weight")  # raises: a GPT with no blocks is a broken file
    return _settle(hp, {
        "layers": layers,
        "model_dim": d,
        "max_text_tokens": s("text_pos_embedding.emb.weight", 2)[0] - 2,
        "max_mel_tokens": mel_pos - 2 - max_cond,
        "number_text_tokens": number_text_tokens,
        "number_mel_codes": n_mel,
        "train_solo_embeddings": "mel_solo_embedding" in s.shapes,
        "conditioning_spec_dim": s("conditioning_encoder.init.weight", 3)[1],
        "conditioning_num_attn_blocks": s.count(r"conditioning_encoder\.attn\.(\d+)\."),
    }, config, s.source, s.component)


def autoregressive_keys(hp: dict) -> dict[str, Shape]:
    d, out = hp["model_dim"], {}
    _conv(out, "conditioning_encoder.init", hp["conditioning_spec_dim"], d, 1)
    for i in range(hp["conditioning_num_attn_blocks"]):
        _attention_block(out, f"conditioning_encoder.attn.{i}", d)
    out["text_embedding.weight"] = (hp["number_text_tokens"] * hp["types"] + 1, d)
    out["mel_embedding.weight"] = (hp["number_mel_codes"], d)
    for i in range(hp["layers"]):
        h = f"gpt.h.{i}"
        _norm(out, f"{h}.ln_1", d)
        # GPT-2 Conv1D stores (in, out); the converter transposes these four after validation
        out[f"{h}.attn.c_attn.weight"], out[f"{h}.attn.c_attn.bias"] = (d, 3 * d), (3 * d,)
        out[f"{h}.attn.c_proj.weight"], out[f"{h}.attn.c_proj.bias"] = (d, d), (d,)
        _norm(out, f"{h}.ln_2", d)
        out[f"{h}.mlp.c_fc.weight"], out[f"{h}.mlp.c_fc.bias"] = (d, 4 * d), (4 * d,)
        out[f"{h}.mlp.c_proj.weight"], out[f"{h}.mlp.c_proj.bias"] = (4 * d, d), (d,)
    _norm(out, "gpt.ln_f", d)
    out["mel_pos_embedding.emb.weight"] = (hp["max_mel_tokens"] + 2 + hp["max_conditioning_inputs"], d)
    out["text_pos_embedding.emb.weight"] = (hp["max_text_tokens"] + 2, d)
    if hp["train_solo_embeddings"]:
        out["mel_solo_embedding"] = out["text_solo_embedding"] = (1, 1, d)
    _norm(out, "final_norm", d)
    _linear(out, "text_head", d, hp["number_text_tokens"] * hp["types"] + 1)
    _linear(out, "mel_head", d, hp["number_mel_codes"])
    return out


# ------------------------------------------------------------------------------------------------------------------
# diffusion: tortoise/models/diffusion_decoder.py DiffusionTts
# ------------------------------------------------------------------------------------------------------------------


def diffusion_hparams(s: Shapes, config: dict) -> dict:
    c, n_in, _ = s("inp_block.weight", 3)
    buckets, heads = s("code_converter.0.relative_pos_embeddings.relative_attention_bias.weight", 2)
    hp = {"relative_attention_max_distance": 64}  # RelativePositionBias(max_distance=64) in AttentionBlock
    n = s.count(r"layers\.(\d+)\.")  # DiffusionLayers, then 3 plain ResBlocks
    if n < 3:
        s(f"layers.{n}.in_layers.0.weight")  # raises
    return _settle(hp, {
        "model_channels": c,
        "num_layers": n - 3,
        "in_channels": n_in,
        "out_channels": s("out.2.weight", 3)[0],
        "in_latent_channels": s("latent_conditioner.0.weight", 3)[1],
        "in_tokens": s("code_embedding.weight", 2)[0],
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
    }, config, s.source, s.component)


def _resblock(out: dict, prefix: str, c: int) -> None:
    """diffusion_decoder.ResBlock(c, c, dropout, use_scale_shift_norm=True), efficient_config (1x1 in conv)."""
    _norm(out, f"{prefix}.in_layers.0", c)
    _conv(out, f"{prefix}.in_layers.2", c, c, 1)
    _linear(out, f"{prefix}.emb_layers.1", c, 2 * c)
    _norm(out, f"{prefix}.out_layers.0", c)
    _conv(out, f"{prefix}.out_layers.3", c, c, 3)


def diffusion_keys(hp: dict) -> dict[str, Shape]:
    c, heads, nb, out = hp["model_channels"], hp["num_heads"], hp["relative_attention_num_buckets"], {}

    def diffusion_layer(prefix):
        _resblock(out, f"{prefix}.resblk", c)
        _attention_block(out, f"{prefix}.attn", c, heads, nb)

    _conv(out, "inp_block", hp["in_channels"], c, 3)
    _linear(out, "time_embed.0", c, c)
    _linear(out, "time_embed.2", c, c)
    out["code_embedding.weight"] = (hp["in_tokens"], c)
    for i in range(3):
        _attention_block(out, f"code_converter.{i}", c, heads, nb)
    _norm(out, "code_norm", c)
    _conv(out, "latent_conditioner.0", hp["in_latent_channels"], c, 3)
    for i in range(1, 5):
        _attention_block(out, f"latent_conditioner.{i}", c, heads, nb)
    _conv(out, "contextual_embedder.0", hp["in_channels"], c, 3)
    _conv(out, "contextual_embedder.1", c, 2 * c, 3)
    for i in range(2, 7):
        _attention_block(out, f"contextual_embedder.{i}", 2 * c, heads, nb)
    out["unconditioned_embedding"] = (1, c, 1)
    for i in range(3):
        diffusion_layer(f"conditioning_timestep_integrator.{i}")
    _conv(out, "integrating_conv", 2 * c, c, 1)
    _conv(out, "mel_head", c, hp["in_channels"], 3)
    for i in range(hp["num_layers"]):
        diffusion_layer(f"layers.{i}")
    for i in range(hp["num_layers"], hp["num_layers"] + 3):
        _resblock(out, f"layers.{i}", c)
    _norm(out, "out.0", c)
    _conv(out, "out.2", c, hp["out_channels"], 3)
    return out


# ------------------------------------------------------------------------------------------------------------------
# clvp: tortoise/models/clvp.py CLVP (use_xformers=True, as api.py builds it)
# ------------------------------------------------------------------------------------------------------------------
_DIM_HEAD = 64  # xtransformers DEFAULT_DIM_HEAD; neither CLVP nor CVVP overrides it


def clvp_hparams(s: Shapes, config: dict) -> dict:
    n_text, dim_text = s("text_emb.weight", 2)
    n_speech, dim_speech = s("speech_emb.weight", 2)
    t = _x_encoder_hparams(s, "text_transformer.transformer", ".wrap")
    sp = _x_encoder_hparams(s, "speech_transformer.transformer", ".wrap")
    dim_head = int(config.get("dim_head", _DIM_HEAD))
    for name, enc in (("text", t), ("speech", sp)):
        _divides(s.source, f"{name} attention width / dim_head", enc["inner"], dim_head)
    hp = {
        "dim_head": dim_head,
        "text_seq_len": int(config.get("text_seq_len", 350)),
        "speech_seq_len": int(config.get("speech_seq_len", 430)),
        "wav_token_compression": int(config.get("wav_token_compression", 1024)),
        "use_xformers": True,
    }
    return _settle(hp, {
        "dim_text": dim_text,
        "dim_speech": dim_speech,
        "dim_latent": s("to_text_latent.weight", 2)[0],
        "num_text_tokens": n_text,
        "text_enc_depth": t["depth"],
        "text_heads": t["inner"] // dim_head,
        "num_speech_tokens": n_speech,
        "speech_enc_depth": sp["depth"],
        "speech_heads": sp["inner"] // dim_head,
        "ff_mult": t["ff_inner"] // dim_text,
        "rotary_emb_dim": 2 * t["rotary_half"],
    }, config, s.source, s.component)


def clvp_keys(hp: dict) -> dict[str, Shape]:
    out = {"temperature": ()}
    out["text_emb.weight"] = (hp["num_text_tokens"], hp["dim_text"])
    _linear(out, "to_text_latent", hp["dim_text"], hp["dim_latent"], bias=False)
    out["speech_emb.weight"] = (hp["num_speech_tokens"], hp["dim_speech"])
    _linear(out, "to_speech_latent", hp["dim_speech"], hp["dim_latent"], bias=False)
    for name in ("text", "speech"):
        dim = hp[f"dim_{name}"]
        _x_encoder(out, f"{name}_transformer.transformer", dim, hp[f"{name}_enc_depth"],
                   hp[f"{name}_heads"] * hp["dim_head"], dim * hp["ff_mult"], hp["rotary_emb_dim"] // 2, ".wrap")
    return out


# ------------------------------------------------------------------------------------------------------------------
# cvvp: tortoise/models/cvvp.py CVVP (mel_codes given, as api.py's load_cvvp does)
# ------------------------------------------------------------------------------------------------------------------
def cvvp_hparams(s: Shapes, config: dict) -> dict:
    half, mel_channels, _ = s("cond_emb.0.weight", 3)
    d = s("cond_emb.1.weight", 3)[0]
    c = _x_encoder_hparams(s, "conditioning_transformer.transformer", "")
    sp = _x_encoder_hparams(s, "speech_transformer.transformer", "")
    dim_head = int(config.get("dim_head", _DIM_HEAD))
    _divides(s.source, "conditioning attention width / dim_head", c["inner"], dim_head)
    _divides(s.source, "to_conditioning_latent width / model_dim", s("to_conditioning_latent.weight", 2)[0], d)
    hp = {"dim_head": dim_head}
    return _settle(hp, {
        "model_dim": d,
        "transformer_heads": c["inner"] // dim_head,
        "conditioning_enc_depth": c["depth"],
        "speech_enc_depth": sp["depth"],
        "mel_channels": mel_channels,
        "mel_codes": s("speech_emb.emb.weight", 2)[0],
        "latent_multiplier": s("to_conditioning_latent.weight", 2)[0] // d,
        "ff_mult": c["ff_inner"] // d,
        "rotary_emb_dim": 2 * c["rotary_half"],
    }, config, s.source, s.component)


def cvvp_keys(hp: dict) -> dict[str, Shape]:
    d, latent = hp["model_dim"], hp["latent_multiplier"] * hp["model_dim"]
    out = {"temperature": ()}
    _conv(out, "cond_emb.0", hp["mel_channels"], d // 2, 5)
    _conv(out, "cond_emb.1", d // 2, d, 3)

    def collapsing(prefix, depth):
        _x_encoder(out, f"{prefix}.transformer", d, depth, hp["transformer_heads"] * hp["dim_head"],
                   d * hp["ff_mult"], hp["rotary_emb_dim"] // 2, "")
        _conv(out, f"{prefix}.pre_combiner.0", d, d, 1)
        _attention_block(out, f"{prefix}.pre_combiner.1", d)
        _conv(out, f"{prefix}.pre_combiner.2", d, d, 1)

    collapsing("conditioning_transformer", hp["conditioning_enc_depth"])
    _linear(out, "to_conditioning_latent", latent, latent, bias=False)
    out["speech_emb.emb.weight"] = (hp["mel_codes"], d)
    collapsing("speech_transformer", hp["speech_enc_depth"])
    _linear(out, "to_speech_latent", latent, latent, bias=False)
    return out


# ------------------------------------------------------------------------------------------------------------------
# vocoder: tortoise/models/vocoder.py UnivNetGenerator (weight norm folded)
# ------------------------------------------------------------------------------------------------------------------
_KP_RESIDUAL_CONVS = 3  # KernelPredictor always builds 3 residual blocks


def vocoder_hparams(s: Shapes, config: dict) -> dict:
    channel_size, noise_dim, _ = s("conv_pre.weight", 3)
    n_blocks = s.count(r"res_stack\.(\d+)\.")
    strides = [s(f"res_stack.{i}.convt_pre.1.weight", 3)[2] // 2 for i in range(n_blocks)]
    n_layers = s.count(r"res_stack\.0\.conv_blocks\.(\d+)\.")
    kp = "res_stack.0.kernel_predictor"
    hidden, n_mel, _ = s(f"{kp}.input_conv.0.weight", 3)
    kpnet_conv_size = s(f"{kp}.kernel_conv.weight", 3)[2]
    conv_kernel_size = s("res_stack.0.conv_blocks.0.1.weight", 3)[2]
    dilations = [int(x) for x in config.get("dilations", [3 ** i for i in range(n_layers)])]
    if len(dilations) != n_layers:
        raise CheckpointError(f"{s.source}: config.json gives {len(dilations)} vocoder dilations but the checkpoint "
                              f"has {n_layers} conv_blocks per LVC block")
    hp = {
        "dilations": dilations,
        "lReLU_slope": float(config.get("lReLU_slope", 0.2)),
        "hop_length": int(config.get("hop_length", math.prod(strides))),
        "kpnet_input_conv_size": 5,  # KernelPredictor.input_conv: Conv1d(cond_channels, hidden, 5, padding=2)
        "conv_post_kernel_size": 7,  # conv_pre / conv_post: kernel 7, reflect padding 3
    }
    return _settle(hp, {
        "noise_dim": noise_dim,
        "channel_size": channel_size,
        "strides": strides,
        "kpnet_conv_size": kpnet_conv_size,
        "n_mel_channels": n_mel,
        "conv_kernel_size": conv_kernel_size,
        "kpnet_hidden_channels": hidden,
    }, config, s.source, s.component)


def vocoder_keys(hp: dict) -> dict[str, Shape]:
    c, hidden, k = hp["channel_size"], hp["kpnet_hidden_channels"], hp["kpnet_conv_size"]
    layers, ck = len(hp["dilations"]), hp["conv_kernel_size"]
    out = {}
    for i, stride in enumerate(hp["strides"]):
        kp = f"res_stack.{i}.kernel_predictor"
        _conv(out, f"{kp}.input_conv.0", hp["n_mel_channels"], hidden, hp["kpnet_input_conv_size"])
        for j in range(_KP_RESIDUAL_CONVS):
            _conv(out, f"{kp}.residual_convs.{j}.1", hidden, hidden, k)
            _conv(out, f"{kp}.residual_convs.{j}.3", hidden, hidden, k)
        _conv(out, f"{kp}.kernel_conv", hidden, c * 2 * c * ck * layers, k)
        _conv(out, f"{kp}.bias_conv", hidden, 2 * c * layers, k)
        # ConvTranspose1d stores (in, out, kernel)
        out[f"res_stack.{i}.convt_pre.1.weight"] = (c, c, 2 * stride)
        out[f"res_stack.{i}.convt_pre.1.bias"] = (c,)
        for j in range(layers):
            _conv(out, f"res_stack.{i}.conv_blocks.{j}.1", c, c, ck)
    _conv(out, "conv_pre", hp["noise_dim"], c, hp["conv_post_kernel_size"])
    _conv(out, "conv_post.1", c, 1, hp["conv_post_kernel_size"])
    return out


# ------------------------------------------------------------------------------------------------------------------
# rlg_auto / rlg_diffuser: tortoise/models/random_latent_generator.py RandomLatentConverter
# ------------------------------------------------------------------------------------------------------------------
def rlg_hparams(s: Shapes, config: dict) -> dict:
    n = s.count(r"layers\.(\d+)\.")
    hp = {"lr_mul": 0.1, "negative_slope": 0.2}  # EqualLinear(lr_mul=.1), fused_leaky_relu(0.2) * sqrt(2)
    return _settle(hp, {"channels": s("layers.0.weight", 2)[0], "equal_linear_layers": n - 1}, config, s.source,
                   s.component)


def rlg_keys(hp: dict) -> dict[str, Shape]:
    out = {}
    for i in range(hp["equal_linear_layers"] + 1):
        _linear(out, f"layers.{i}", hp["channels"], hp["channels"])
    return out


# ------------------------------------------------------------------------------------------------------------------
# hifigan: tortoise/models/hifigan_decoder.py HifiganGenerator (api_fast.py's decoder, hifidecoder.pth)
# ------------------------------------------------------------------------------------------------------------------
# hifidecoder.pth is HifiganGenerator's own state dict (no wrapper key), its convolutions weight-normed
# (x.weight_g / x.weight_v, folded by the converter: weight_norm_pairs); cond_layer is a plain Conv1d. api_fast.py
# loads it with load_state_dict(strict=False), so tortoise would silently ignore keys that are not the generator's
# and leave missing ones at their random initial values. The only foreign keys a HiFi-GAN decoder checkpoint is
# known to carry are a speaker encoder's (coqui XTTS's HifiDecoder saves ``speaker_encoder.*`` beside the
# generator): the registry entry ignores those (``legacy``); any other unknown or missing key is an error here,
# not random weights.
HIFIGAN_IGNORED = r"speaker_encoder\."
_HIFIGAN_CONV_PRE_POST = 7  # conv_pre / conv_post: Conv1d(..., 7, 1, padding=3) in HifiganGenerator.__init__
_HIFIGAN_DEFAULT_DILATIONS = {"1": [1, 3, 5], "2": [1, 3]}  # api_fast.py's [[1, 3, 5]] * 3; ResBlock2's default


def hifigan_hparams(s: Shapes, config: dict) -> dict:
    ch0, n_in, _ = s("conv_pre.weight", 3)
    n_up = s.count(r"ups\.(\d+)\.")
    if n_up == 0:
        s("ups.0.weight")  # raises
    up_kernels = [s(f"ups.{i}.weight", 3)[2] for i in range(n_up)]
    n_res = s.count(r"resblocks\.(\d+)\.")
    if n_res == 0 or n_res % n_up:
        raise CheckpointError(f"{s.source}: {n_res} resblocks do not make the same number of ResBlocks per each of "
                              f"the {n_up} upsamples (missing key resblocks.{n_res}.*?)")
    n_k = n_res // n_up
    rtype = "1" if "resblocks.0.convs1.0.weight" in s.shapes else "2"
    conv = "convs1" if rtype == "1" else "convs"
    kernels = [s(f"resblocks.{j}.{conv}.0.weight", 3)[2] for j in range(n_k)]
    dilations = config.get("resblock_dilation_sizes", [_HIFIGAN_DEFAULT_DILATIONS[rtype]] * n_k)
    if not (isinstance(dilations, (list, tuple)) and all(isinstance(d, (list, tuple)) for d in dilations)
            and len(dilations) == n_k):
        raise CheckpointError(f"{s.source}: config.json gives hifigan resblock_dilation_sizes={dilations!r}: "
                              f"expected one list of dilations per each of the {n_k} ResBlock kernel sizes")
    per = 3 if rtype == "1" else 2  # what ResBlock1 / ResBlock2 read of each list
    hp = {
        # HiFi-GAN's rule, which api_fast.py's [16, 16, 4, 4] / [8, 8, 2, 2] follows: kernel = 2 * factor
        "upsample_factors": [int(u) for u in config.get("upsample_factors", [k // 2 for k in up_kernels])],
        "resblock_dilations": [int(x) for d in dilations for x in list(d)[:per]],
    }
    return _settle(hp, {
        "in_channels": n_in,
        "out_channels": s("conv_post.weight", 3)[0],
        "resblock_type": rtype,
        "resblock_kernel_sizes": kernels,
        "upsample_kernel_sizes": up_kernels,
        "upsample_initial_channel": ch0,
        "cond_channels": s("cond_layer.weight", 3)[1] if "cond_layer.weight" in s.shapes else 0,
        "conv_post_bias": "conv_post.bias" in s.shapes,
    }, config, s.source, s.component)


def hifigan_keys(hp: dict) -> dict[str, Shape]:
    ch, out = hp["upsample_initial_channel"], {}
    _conv(out, "conv_pre", hp["in_channels"], ch, _HIFIGAN_CONV_PRE_POST)
    per = 3 if hp["resblock_type"] == "1" else 2
    convs = ("convs1", "convs2") if hp["resblock_type"] == "1" else ("convs",)
    n_k = len(hp["resblock_kernel_sizes"])
    for i, k_up in enumerate(hp["upsample_kernel_sizes"]):
        # ConvTranspose1d stores (in, out, kernel)
        out[f"ups.{i}.weight"] = (ch, ch // 2, k_up)
        out[f"ups.{i}.bias"] = (ch // 2,)
        ch //= 2
        for j, k in enumerate(hp["resblock_kernel_sizes"]):
            for name in convs:
                for d in range(per):
                    _conv(out, f"resblocks.{i * n_k + j}.{name}.{d}", ch, ch, k)
    out["conv_post.weight"] = (hp["out_channels"], ch, _HIFIGAN_CONV_PRE_POST)
    if hp["conv_post_bias"]:
        out["conv_post.bias"] = (hp["out_channels"],)
    if hp["cond_channels"]:
        _conv(out, "cond_layer", hp["cond_channels"], hp["upsample_initial_channel"], 1)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------------------
def weight_norm_pairs(keys, source: str) -> dict[str, tuple[str, str]]:
    """{folded key: (g key, v key)} for every ``x.weight_g`` / ``x.weight_v`` pair; an unpaired half raises."""
    keys = set(keys)
    pairs = {}
    for k in keys:
        if k.endswith(".weight_g") or k.endswith(".weight_v"):
            base = k[: -len("_g")]
            g, v = base + "_g", base + "_v"
            if g not in keys or v not in keys:
                raise CheckpointError(f"{source}: weight-norm key {k!r} has no partner "
                                      f"{(v if k == g else g)!r}")
            if base in keys:
                raise CheckpointError(f"{source}: {base!r} is stored both plain and weight-normed")
            pairs[base] = (g, v)
    return pairs


def summary(hp: dict, limit: int = 6) -> str:
    """The leading size hyperparameters, to show which architecture a key was checked against."""
    sizes = [f"{k}={v}" for k, v in hp.items() if isinstance(v, int) and not isinstance(v, bool)]
    return ", ".join(sizes[:limit]) + (", ..." if len(sizes) > limit else "")


__all__ = ["CheckpointError", "Shapes", "weight_norm_pairs", "summary"]
