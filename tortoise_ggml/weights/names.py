"""The GGUF tensor name of each state-dict key (the component prefixes are the registry's).

ggml keeps tensor names in a fixed 64-byte field (63 bytes + NUL) and some Tortoise keys are 94 bytes long, so a
GGUF tensor name is a short component prefix plus the key with a few abbreviations. Model code never sees these
names: ``ModelFile.weights(component)[key]`` takes the original key, and the file lists the original keys itself.
"""
from __future__ import annotations

from ..models.config import METADATA_ROOT
from .registry import REGISTRY

MAX_NAME_BYTES = 63  # GGML_MAX_NAME (64) minus the terminating NUL

ARCHITECTURE = METADATA_ROOT  # general.architecture, and the prefix of every metadata key
FORMAT_VERSION = 1         # tortoise.format_version: bump when a reader of the old layout would misread a file
MEL_NORMS_TENSOR = "mel_norms"
VOICE_PARTS = ("autoregressive", "diffusion")  # the two conditioning latents of a stored voice

# Applied in order. Every short form holds a '~', which never occurs in a state-dict key (attribute paths), so a name
# expands back to exactly one key (``key_from_name``): tensor_name checks that round trip, which makes it injective.
ABBREVIATIONS = (
    (".wrap.", ".~w."),  # CLVP's CheckpointedLayer wrapper: one level with no weights of its own
    ("transformer.attn_layers.layers.", "~L."),
    ("transformer.attn_layers.", "~A."),
    ("relative_pos_embeddings.relative_attention_bias.", "~rpb."),
    ("conditioning_timestep_integrator.", "~cti."),
    ("kernel_predictor.", "~kp."),
    ("residual_convs.", "~rc."),
)


class TensorNameError(ValueError):
    """A key that has no valid GGUF tensor name."""


def _prefix(component: str) -> str:
    try:
        return REGISTRY[component].prefix
    except KeyError:
        raise TensorNameError(f"unknown component {component!r}: expected one of {', '.join(REGISTRY)}") from None


def key_from_name(component: str, name: str) -> str:
    """The state-dict key that ``tensor_name(component, key)`` turned into ``name``."""
    prefix = _prefix(component)
    if not name.startswith(prefix):
        raise TensorNameError(f"tensor {name!r} does not belong to {component} (prefix {prefix!r})")
    key = name[len(prefix):]
    for long, short in reversed(ABBREVIATIONS):
        key = key.replace(short, long)
    return key


def tensor_name(component: str, key: str) -> str:
    """The GGUF tensor name of state-dict ``key`` of ``component`` (at most 63 bytes)."""
    name = _prefix(component)
    if "~" in key:
        raise TensorNameError(f"{component} key {key!r} contains '~', which the tensor name abbreviations reserve")
    short = key
    for long, abbr in ABBREVIATIONS:
        short = short.replace(long, abbr)
    name += short
    if key_from_name(component, name) != key:
        raise TensorNameError(f"{component} key {key!r} abbreviates to {name!r}, which does not expand back to it")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise TensorNameError(f"tensor name {name!r} for {component} is {len(name.encode())} bytes, over ggml's "
                              f"{MAX_NAME_BYTES}-byte limit: add an abbreviation in tortoise_ggml/names.py")
    return name


def voice_tensor_name(voice: str, part: str) -> str:
    """The tensor holding one of a stored voice's conditioning latents (``part`` in VOICE_PARTS)."""
    return f"voice.{voice}.{part}"


__all__ = ["ARCHITECTURE", "FORMAT_VERSION", "MEL_NORMS_TENSOR", "VOICE_PARTS", "voice_tensor_name", "ABBREVIATIONS",
           "MAX_NAME_BYTES", "tensor_name", "key_from_name", "TensorNameError"]
