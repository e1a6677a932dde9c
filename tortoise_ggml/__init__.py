"""Tortoise TTS inference on ggml."""
from pkgutil import extend_path

# Run from a source checkout, this directory shadows the installed package, which alone holds the compiled kernels
# library (tortoise_ggml/kernels): let the package span both, as pyggml does for its extension.
__path__ = extend_path(__path__, __name__)
