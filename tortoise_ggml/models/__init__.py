"""Tortoise's models as ggml graphs; each module sits beside its tortoise/models counterpart."""
