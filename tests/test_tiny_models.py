"""The tiny test models are not degenerate: norms are not the identity and the text
encoder's outputs have a mean well away from 0 (A1111 weighting divides by it)."""
from __future__ import annotations

import pytest
import torch

from controldiff import Pipeline


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_norms_have_random_affine_and_text_means_are_not_zero(tiny_model, family):
    pipe = Pipeline.from_pretrained(tiny_model(family))
    for model in (pipe.unet, pipe.vae, *pipe.text_encoders):
        norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))]
        assert norms
        for m in norms:
            assert not torch.equal(m.weight, torch.ones_like(m.weight))
            assert not torch.equal(m.bias, torch.zeros_like(m.bias))
    for text in ("a red cat on a mat", ""):
        embeds = pipe.prompt_encoder.encode([text]).embeds
        width = embeds.shape[-1] // len(pipe.text_encoders)
        # each encoder's part (SDXL: penultimate states side by side). float32 rounds a mean of
        # 77 x 32 values of order 1 to ~1e-7, so a mean above 0.1 is known to 1e-6 relative
        for i in range(len(pipe.text_encoders)):
            assert abs(float(embeds[..., i * width:(i + 1) * width].mean())) > 0.1
