"""The component registry: everything about one Tortoise component in one entry (as llama.cpp's
convert_hf_to_gguf registers one class per architecture).

An entry names the release checkpoint file, the GGUF tensor prefix, the schema (hyperparameters from the
checkpoint's shapes and the exact key -> shape table they imply: tortoise_ggml.weights.checkpoints), the keys to
ignore or resolve as aliases, the storage rules (GPT-2 Conv1D weights transposed, Conv1d kernels flattened into
matrices, tables gathered by row and so never in a repacked matmul layout), the typed config and the ggml model
class. The converter, the model file loader and TextToSpeech read it; adding a component is one entry here, one
schema and one model file.

The model class is named, not imported ("module:Class"), so the converter and the loader never import graph code.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable

from ..models import config as configs
from . import checkpoints as ck

Shape = tuple[int, ...]
Q8_0_BLOCK = 32  # q8_0 quantizes runs of 32 values along a row

# Embedding tables (torch nn.Embedding: token, position and relative-position-bias tables) are gathered by row, never
# multiplied: every other 2-D weight is a matmul weight, which a CPU may keep in a repacked kernel layout.
GATHERED = re.compile(r"(^|.*\.)(\w+_emb|\w+_embedding|emb|relative_attention_bias)\.weight$")


@dataclass(frozen=True)
class Component:
    name: str                   # as tortoise/api.py's MODELS and the GGUF metadata call it
    checkpoint: str             # the release file
    prefix: str                 # of its GGUF tensor names
    config: type[configs.Config]
    model: str | None           # "module:Class" under tortoise_ggml.models (None: no ggml model yet)
    hparams: Callable           # (checkpoints.Shapes, config.json kwargs) -> {constructor argument: value}
    keys: Callable              # hparams -> {state-dict key: shape}
    state_dict_in: str | None = None          # the checkpoint holds the state dict under this key
    legacy: re.Pattern | None = None          # keys tortoise itself ignores on load
    aliases: tuple[tuple[str, str], ...] = ()  # (alias prefix, original prefix): keys that duplicate others
    transposed: re.Pattern | None = None      # Conv1D weights stored (in, out): laid out (out, in) like Linear
    flat_convs: bool = False    # f16/q8_0 files store its Conv1d kernels as (out, in*k) matrices
    gathered: re.Pattern = GATHERED
    api_name: str = ""          # its attribute on TextToSpeech, as tortoise names it (default: name)
    optional: bool = False      # not a tortoise/api.py release file: converted by default only when present

    @property
    def attribute(self) -> str:
        return self.api_name or self.name

    # -- checkpoint keys -------------------------------------------------------------------------------------------
    def alias_of(self, key: str) -> str | None:
        """The key that ``key`` duplicates (aliases resolve in steps), or None when it is no alias."""
        resolved = key
        for alias, original in self.aliases:
            if resolved.startswith(alias):
                resolved = original + resolved[len(alias):]
        return resolved if resolved != key else None

    def is_legacy(self, key: str) -> bool:
        return self.legacy is not None and bool(self.legacy.match(key))

    # -- validation ----------------------------------------------------------------------------------------------
    def validate(self, shapes: dict[str, Shape], source: str, config: dict | None = None):
        """Check a checkpoint's ``{key: shape}`` (weight norm already folded) against this architecture.

        Returns ``(hparams, ignored)``: the hyperparameters, and ``{ignored key: reason}`` for the keys tortoise
        itself ignores (legacy buffers) or that duplicate another key (aliases; the converter checks their
        values). Raises CheckpointError naming the file and the first unknown, missing or mis-shaped key, or a
        hyperparameter the typed config refuses.
        """
        shapes = {k: tuple(int(n) for n in v) for k, v in shapes.items()}
        ignored, kept = {}, {}
        for k, v in shapes.items():
            orig = self.alias_of(k)
            if self.is_legacy(k) or (orig is not None and self.is_legacy(orig)):
                ignored[k] = "legacy buffer tortoise ignores"
            elif orig is not None:
                ignored[k] = f"alias of {orig}"
            else:
                kept[k] = v
        for k, why in ignored.items():
            orig = why[len("alias of "):] if why.startswith("alias of ") else None
            if orig is not None and (orig not in kept or kept[orig] != shapes[k]):
                raise ck.CheckpointError(f"{source}: {k!r} should duplicate {orig!r}, which is "
                                         + ("missing" if orig not in kept else
                                            f"shaped {kept[orig]}, not {shapes[k]}"))
        hparams = self.hparams(ck.Shapes(kept, source, self.name), dict(config or {}))
        try:
            self.config.from_metadata(hparams, source, self.name)
        except configs.ConfigError as e:
            raise ck.CheckpointError(str(e)) from None
        expected = self.keys(hparams)
        described = f"the {self.name} model with {ck.summary(hparams)}"
        unknown = [k for k in kept if k not in expected]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise ck.CheckpointError(f"{source}: unknown key {unknown[0]!r}{more}: not part of {described}")
        missing = [k for k in expected if k not in kept]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ck.CheckpointError(f"{source}: missing key {missing[0]!r}{more} for {described}")
        for k, want in expected.items():
            if kept[k] != want:
                raise ck.CheckpointError(f"{source}: key {k!r} has shape {kept[k]}, expected {want} for {described}")
        return hparams, ignored

    # -- storage rules ---------------------------------------------------------------------------------------------
    def stored_shape(self, key: str, shape: Shape, wanted: str = "f32") -> Shape:
        """The shape a tensor is stored with (numpy order) in a file of type ``wanted``."""
        if self.transposed is not None and self.transposed.match(key):
            return tuple(shape[::-1])
        if (wanted != "f32" and self.flat_convs and len(shape) == 3 and key.endswith(".weight")
                and (wanted != "q8_0" or shape[1] * shape[2] % Q8_0_BLOCK == 0)):
            return (shape[0], shape[1] * shape[2])  # the same memory as torch's (out, in, k)
        return tuple(shape) if shape else (1,)  # ggml has no 0-d tensors (CLVP/CVVP temperature)

    @staticmethod
    def storage_type(key: str, stored: Shape, wanted: str) -> str:
        """f32 for everything but matrices (Linear, embedding, flattened conv weights); q8_0 needs rows that are
        whole blocks, else f16. T5 relative-position tables are tiny and added to scores: kept F32."""
        matrix = len(stored) == 2 and key.endswith("weight") and "relative_attention_bias" not in key
        if wanted == "f32" or not matrix:
            return "f32"
        if wanted == "q8_0" and stored[-1] % Q8_0_BLOCK:
            return "f16"
        return wanted

    def is_gathered(self, key: str) -> bool:
        return bool(self.gathered.match(key))

    # -- the model -------------------------------------------------------------------------------------------------
    def model_class(self):
        if self.model is None:
            raise NotImplementedError(f"tortoise-ggml has no model for the {self.name} component yet")
        module, cls = self.model.split(":")
        return getattr(importlib.import_module(f"tortoise_ggml.models.{module}"), cls)


# transformers < 4.31 saved GPT2Attention's causal-mask buffers; UnifiedVoice loads with strict=False and never
# reads them.
_GPT2_LEGACY = re.compile(r"gpt\.h\.\d+\.attn\.(bias|masked_bias)$")
# post_init_gpt2_config registers modules UnifiedVoice already owns a second time (GPT2InferenceModel, whose
# "text_pos_embedding" is the mel one, and gpt.wte = mel_embedding), so a state dict saved after it holds those
# tensors twice. Aliases resolve in steps: inference_model.transformer.wte -> gpt.wte -> mel_embedding.
_AR_ALIASES = (("inference_model.transformer.", "gpt."), ("inference_model.text_pos_embedding.", "mel_pos_embedding."),
               ("inference_model.embeddings.", "mel_embedding."), ("inference_model.final_norm.", "final_norm."),
               ("inference_model.lm_head.0.", "final_norm."), ("inference_model.lm_head.1.", "mel_head."),
               ("gpt.wte.", "mel_embedding."))
# GPT-2 Conv1D weights, stored (in, out)
_GPT2_CONV1D = re.compile(r"gpt\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")

# Release order (tortoise/api.py MODELS); also the order of the components in a GGUF file.
REGISTRY: dict[str, Component] = {c.name: c for c in (
    Component("autoregressive", "autoregressive.pth", "ar.", configs.AutoregressiveConfig,
              "autoregressive:UnifiedVoice", ck.autoregressive_hparams, ck.autoregressive_keys,
              legacy=_GPT2_LEGACY, aliases=_AR_ALIASES, transposed=_GPT2_CONV1D),
    # the diffusion decoder's convolutions are most of its weights and its compute (one product after im2col)
    Component("diffusion", "diffusion_decoder.pth", "diff.", configs.DiffusionConfig,
              "diffusion_decoder:DiffusionTts", ck.diffusion_hparams, ck.diffusion_keys, flat_convs=True),
    Component("clvp", "clvp2.pth", "clvp.", configs.ClvpConfig, "clvp:CLVP", ck.clvp_hparams, ck.clvp_keys),
    Component("cvvp", "cvvp.pth", "cvvp.", configs.CvvpConfig, "cvvp:CVVP", ck.cvvp_hparams, ck.cvvp_keys),
    Component("vocoder", "vocoder.pth", "voc.", configs.VocoderConfig, "vocoder:UnivNetGenerator",
              ck.vocoder_hparams, ck.vocoder_keys, state_dict_in="model_g"),
    Component("rlg_auto", "rlg_auto.pth", "rlg_ar.", configs.RandomLatentConfig,
              "random_latent_generator:RandomLatentConverter", ck.rlg_hparams, ck.rlg_keys),
    Component("rlg_diffuser", "rlg_diffuser.pth", "rlg_diff.", configs.RandomLatentConfig,
              "random_latent_generator:RandomLatentConverter", ck.rlg_hparams, ck.rlg_keys,
              api_name="rlg_diffusion"),
    # tortoise/api_fast.py's decoder (AR latents -> 24 kHz audio), released separately: optional
    Component("hifigan", "hifidecoder.pth", "hifi.", configs.HifiganConfig, "hifigan_decoder:HifiganGenerator",
              ck.hifigan_hparams, ck.hifigan_keys, legacy=re.compile(ck.HIFIGAN_IGNORED), api_name="hifi_decoder",
              optional=True),
)}
COMPONENTS = tuple(REGISTRY)
REQUIRED_COMPONENTS = tuple(c for c in COMPONENTS if not REGISTRY[c].optional)


class UnknownComponent(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def component(name: str) -> Component:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownComponent(f"unknown component {name!r}: expected one of {', '.join(COMPONENTS)}") from None


__all__ = ["Component", "REGISTRY", "COMPONENTS", "REQUIRED_COMPONENTS", "GATHERED", "Q8_0_BLOCK", "component",
           "UnknownComponent"]
