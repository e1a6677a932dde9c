"""Numpy front-ends and samplers, as tortoise/utils: audio, text, sampling (AR logits), diffusion (the sampler)."""
