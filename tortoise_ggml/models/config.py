"""Typed configs: one dataclass per component, its fields named as tortoise's constructor arguments.

A config is what the GGUF metadata says about a model (``tortoise.<component>.<field>``, docs/gguf-format.md). The
converter builds it from the checkpoint's shapes and writes it; the loader reads it back with ``from_metadata``,
which names the file, the key and the problem (ConfigError) for a missing, mis-typed or out-of-range value. Every
size a model, a front-end or the pipeline uses comes from here. No pyggml and no numpy: the converter and the
registry import this module on their own.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import ClassVar

METADATA_ROOT = "tortoise"  # the GGUF metadata namespace (general.architecture)


class ConfigError(ValueError):
    """Metadata that does not make a valid config; the message names the file, the key and the problem."""


class _Bad(str):
    """What _check_value returns for a value of the wrong type: the problem, told apart from a string value."""


def _check_value(name: str, hint, value):
    """``value`` as the field's declared type (int, float, bool, str, list[int]), or a _Bad saying why not."""
    if hint is bool:
        return value if isinstance(value, bool) else _Bad(f"is {value!r}, expected true or false")
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value if ok else _Bad(f"is {value!r}, expected an integer")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return _Bad(f"is {value!r}, expected a finite number")
        return float(value)
    if hint is str:
        return value if isinstance(value, str) else _Bad(f"is {value!r}, expected a string")
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
            return _Bad(f"is {value!r}, expected a list of integers")
        return [int(v) for v in value]
    raise TypeError(f"config field {name}: unsupported type {hint!r}")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every component config: typed fields, read from and written to GGUF metadata."""

    component: ClassVar[str] = ""
    source: str = field(default="", compare=False, repr=False)  # the file, for error messages

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.name != "source"]

    @classmethod
    def from_metadata(cls, values: typing.Mapping, source: str = "", component: str | None = None):
        """The config from ``{field: value}`` (a component's metadata without its prefix). Missing keys take the
        field's default where it has one (tortoise's constructor default); unknown keys are ignored (written by a
        newer converter)."""
        component = component or cls.component
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in cls.fields():
            key = f"{METADATA_ROOT}.{component}.{f.name}"
            if f.name not in values:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ConfigError(f"{source or 'model file'}: missing metadata {key} ({cls.__name__})")
                continue
            checked = _check_value(f.name, hints[f.name], values[f.name])
            if isinstance(checked, _Bad):
                raise ConfigError(f"{source or 'model file'}: metadata {key} {checked}")
            kwargs[f.name] = checked
        config = cls(**kwargs, source=source)
        config.validate(component)
        return config

    def to_metadata(self) -> dict:
        return {f.name: getattr(self, f.name) for f in self.fields()}

    def validate(self, component: str | None = None) -> None:
        """Range checks: every size field is positive; subclasses add the relations between fields."""
        for f in self.fields():
            value = getattr(self, f.name)
            if f.metadata.get("size") and not (isinstance(value, int) and value > 0):
                self._fail(component, f.name, f"is {value!r}, expected a positive integer")
            if f.metadata.get("sizes") and (not value or any(v <= 0 for v in value)):
                self._fail(component, f.name, f"is {value!r}, expected positive integers")
            if f.metadata.get("nonnegative") and value < 0:
                self._fail(component, f.name, f"is {value!r}, expected a number >= 0")

    def _fail(self, component: str | None, name: str, problem: str) -> typing.NoReturn:
        raise ConfigError(f"{self.source or 'model file'}: metadata "
                          f"{METADATA_ROOT}.{component or self.component}.{name} {problem}")

    def _divides(self, name: str, whole: int, part: int, what: str) -> None:
        if part <= 0 or whole % part:
            self._fail(None, name, f"({whole}) is not a multiple of {what} ({part})")


def size(default=dataclasses.MISSING):
    """A positive integer field."""
    return field(default=default, metadata={"size": True})


def sizes():
    return field(metadata={"sizes": True})


def nonnegative(default):
    return field(default=default, metadata={"nonnegative": True})


# ------------------------------------------------------------------------------------------------------------------
# one per component, in release order
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class AutoregressiveConfig(Config):
    """tortoise/models/autoregressive.py UnifiedVoice."""

    component: ClassVar[str] = "autoregressive"
    layers: int = size()
    model_dim: int = size()
    heads: int = size()
    max_text_tokens: int = size()
    max_mel_tokens: int = size()
    max_conditioning_inputs: int = size()
    number_text_tokens: int = size()
    number_mel_codes: int = size()
    start_text_token: int = size()
    stop_text_token: int = 0
    start_mel_token: int = size()
    stop_mel_token: int = size()
    types: int = size(1)
    train_solo_embeddings: bool = False
    mel_length_compression: int = size(1024)
    layer_norm_epsilon: float = nonnegative(1e-5)
    conditioning_spec_dim: int = size(80)
    conditioning_num_attn_blocks: int = nonnegative(6)
    conditioning_num_attn_heads: int = size()

    def validate(self, component=None) -> None:
        super().validate(component)
        self._divides("model_dim", self.model_dim, self.heads, "heads")
        self._divides("model_dim", self.model_dim, self.conditioning_num_attn_heads, "conditioning_num_attn_heads")
        for name in ("start_mel_token", "stop_mel_token"):
            if getattr(self, name) >= self.number_mel_codes:
                self._fail(component, name, f"({getattr(self, name)}) is not a code below number_mel_codes "
                                            f"({self.number_mel_codes})")
        for name in ("start_text_token", "stop_text_token"):
            if not 0 <= getattr(self, name) < self.text_vocab:
                self._fail(component, name, f"({getattr(self, name)}) is not a token of the text vocabulary "
                                            f"(0..{self.text_vocab - 1})")

    @property
    def text_vocab(self) -> int:
        """Rows of the text embedding: number_text_tokens * types + 1 (the start token)."""
        return self.number_text_tokens * self.types + 1


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig(Config):
    """tortoise/models/diffusion_decoder.py DiffusionTts."""

    component: ClassVar[str] = "diffusion"
    model_channels: int = size()
    num_layers: int = size()
    in_channels: int = size()
    out_channels: int = size()
    in_latent_channels: int = size()
    in_tokens: int = size()
    num_heads: int = size()
    relative_attention_num_buckets: int = size(32)
    relative_attention_max_distance: int = size(64)

    def validate(self, component=None) -> None:
        super().validate(component)
        self._divides("model_channels", self.model_channels, self.num_heads, "num_heads")


@dataclass(frozen=True, kw_only=True)
class ClvpConfig(Config):
    """tortoise/models/clvp.py CLVP (use_xformers=True)."""

    component: ClassVar[str] = "clvp"
    dim_text: int = size()
    dim_speech: int = size()
    dim_latent: int = size()
    num_text_tokens: int = size()
    text_enc_depth: int = size()
    text_heads: int = size()
    num_speech_tokens: int = size()
    speech_enc_depth: int = size()
    speech_heads: int = size()
    text_seq_len: int = size(350)
    speech_seq_len: int = size(430)
    wav_token_compression: int = size(1024)
    dim_head: int = size(64)
    ff_mult: int = size(4)
    rotary_emb_dim: int = size()
    use_xformers: bool = True

    def validate(self, component=None) -> None:
        super().validate(component)
        if not self.use_xformers:
            self._fail(component, "use_xformers", "is false: only the x-transformers CLVP (what tortoise/api.py "
                                                  "builds) is implemented")


@dataclass(frozen=True, kw_only=True)
class CvvpConfig(Config):
    """tortoise/models/cvvp.py CVVP."""

    component: ClassVar[str] = "cvvp"
    model_dim: int = size()
    transformer_heads: int = size()
    conditioning_enc_depth: int = size()
    speech_enc_depth: int = size()
    mel_channels: int = size(80)
    mel_codes: int = size()
    latent_multiplier: int = size(1)
    dim_head: int = size(64)
    ff_mult: int = size(4)
    rotary_emb_dim: int = size()


@dataclass(frozen=True, kw_only=True)
class VocoderConfig(Config):
    """tortoise/models/vocoder.py UnivNetGenerator."""

    component: ClassVar[str] = "vocoder"
    noise_dim: int = size(64)
    channel_size: int = size(32)
    strides: list[int] = sizes()
    dilations: list[int] = sizes()
    lReLU_slope: float = nonnegative(0.2)
    kpnet_conv_size: int = size(3)
    n_mel_channels: int = size(100)
    conv_kernel_size: int = size(3)
    kpnet_hidden_channels: int = size(64)
    hop_length: int = size(256)
    kpnet_input_conv_size: int = size(5)
    conv_post_kernel_size: int = size(7)

    def validate(self, component=None) -> None:
        super().validate(component)
        if math.prod(self.strides) != self.hop_length:
            self._fail(component, "hop_length", f"({self.hop_length}) is not the product of the strides "
                                                f"{self.strides}")


@dataclass(frozen=True, kw_only=True)
class RandomLatentConfig(Config):
    """tortoise/models/random_latent_generator.py RandomLatentConverter (rlg_auto and rlg_diffuser)."""

    component: ClassVar[str] = "rlg_auto"
    channels: int = size()
    equal_linear_layers: int = size(5)
    lr_mul: float = nonnegative(0.1)
    negative_slope: float = nonnegative(0.2)


@dataclass(frozen=True, kw_only=True)
class HifiganConfig(Config):
    """tortoise/models/hifigan_decoder.py HifiganGenerator (api_fast.py's decoder). ``resblock_dilations`` is the
    constructor's ``resblock_dilation_sizes`` flattened (GGUF arrays are flat): each ResBlock's dilations in turn,
    3 per block of type "1", 2 per block of type "2" (what the reference's ResBlock1 / ResBlock2 read)."""

    component: ClassVar[str] = "hifigan"
    in_channels: int = size()
    out_channels: int = size(1)
    resblock_type: str = "1"
    resblock_kernel_sizes: list[int] = sizes()
    resblock_dilations: list[int] = sizes()
    upsample_kernel_sizes: list[int] = sizes()
    upsample_factors: list[int] = sizes()
    upsample_initial_channel: int = size()
    cond_channels: int = nonnegative(0)
    conv_post_bias: bool = True

    DILATIONS_PER_BLOCK: ClassVar[dict[str, int]] = {"1": 3, "2": 2}

    def validate(self, component=None) -> None:
        super().validate(component)
        if self.resblock_type not in self.DILATIONS_PER_BLOCK:
            self._fail(component, "resblock_type", f"is {self.resblock_type!r}, expected '1' or '2'")
        per = self.DILATIONS_PER_BLOCK[self.resblock_type]
        if len(self.resblock_dilations) != per * len(self.resblock_kernel_sizes):
            self._fail(component, "resblock_dilations", f"has {len(self.resblock_dilations)} values, expected {per} "
                                                         f"per ResBlock{self.resblock_type} for the "
                                                         f"{len(self.resblock_kernel_sizes)} kernel sizes")
        if len(self.upsample_factors) != len(self.upsample_kernel_sizes):
            self._fail(component, "upsample_factors", f"{self.upsample_factors} does not pair with the upsample "
                                                       f"kernel sizes {self.upsample_kernel_sizes}")
        for u, k in zip(self.upsample_factors, self.upsample_kernel_sizes):
            if k < u or (k - u) % 2:
                self._fail(component, "upsample_factors", f"factor {u} with kernel {k}: the transposed convolution "
                                                           "(padding (k-u)/2) would not upsample exactly")
            if k % u:  # every HiFi-GAN config has k = 2u; ggml's time-major transposed conv takes k = n*u
                self._fail(component, "upsample_factors", f"factor {u} with kernel {k}: tortoise-ggml needs kernels "
                                                           "that are a multiple of their factor")
        self._divides("upsample_initial_channel", self.upsample_initial_channel, 2 ** len(self.upsample_factors),
                      "2 ** upsamples")
        if any(k % 2 == 0 for k in self.resblock_kernel_sizes):
            self._fail(component, "resblock_kernel_sizes", f"{self.resblock_kernel_sizes}: 'same' convolutions need "
                                                           "odd kernels")

    @property
    def hop_length(self) -> int:
        """Output samples per input frame (the product of the upsample factors)."""
        return math.prod(self.upsample_factors)

    def channels(self, level: int) -> int:
        """Channels after upsample ``level`` (0-based); level -1: conv_pre's output."""
        return self.upsample_initial_channel // 2 ** (level + 1)

    def dilations(self, block: int) -> list[int]:
        """The dilations of ResBlock ``block`` (of each level's ``len(resblock_kernel_sizes)``)."""
        per = self.DILATIONS_PER_BLOCK[self.resblock_type]
        return list(self.resblock_dilations[per * block: per * (block + 1)])


@dataclass(frozen=True, kw_only=True)
class AudioConfig(Config):
    """The front-end and pipeline sizes tortoise/api.py and tortoise/utils/audio.py fix: sample rates, clip
    lengths, STFT hops. Files from older converters lack these keys: the defaults are tortoise's values."""

    component: ClassVar[str] = "audio"
    input_sample_rate: int = size(22050)        # conditioning clips and the AR codes
    output_sample_rate: int = size(24000)       # the diffusion mels and the vocoder's audio
    conditioning_length: int = size(132300)     # samples of an AR conditioning clip (format_conditioning)
    diffusion_conditioning_length: int = size(102400)   # samples of a diffusion conditioning clip, at 24 kHz
    mel_hop_length: int = size(256)             # both mels' STFT hop

    def diffusion_frames(self, n_codes: int, mel_length_compression: int) -> int:
        """Frames of 24 kHz mel the diffusion model makes for ``n_codes`` AR codes (tortoise/api.py's
        output_seq_len = codes * 4 * 24000 // 22050): each code is mel_length_compression samples at the input
        rate, i.e. mel_length_compression / hop mel frames, resampled to the output rate."""
        per_code = mel_length_compression // self.mel_hop_length
        return n_codes * per_code * self.output_sample_rate // self.input_sample_rate


__all__ = ["Config", "ConfigError", "AutoregressiveConfig", "DiffusionConfig", "ClvpConfig", "CvvpConfig",
           "VocoderConfig", "RandomLatentConfig", "HifiganConfig", "AudioConfig", "METADATA_ROOT"]
