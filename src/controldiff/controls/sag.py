"""Self-attention guidance (SAG), as diffusers' ``StableDiffusionSAGPipeline``.

The mid-block's first self-attention map of the unconditional branch ("cond" when
guidance is off) marks where the image attends most; the predicted x0 is blurred there,
re-noised to the current level and run through the UNet again (with that branch's
text and any residuals other controls added); the guidance is
``scale * (pred - degraded_pred)``, added after CFG.

Only that one site gets a processor, and only for this call: it leaves every row's
output to the inner (default) computation and computes explicit-softmax maps for the
rows it reads. A call that skips the mid block (a DeepCache cached step) uses the map of
the last call that ran it, as DeepCache reuses the deep features themselves.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..sampling.control import Control

SITE = "mid_block.attentions.0.transformer_blocks.0.attn1"


def gaussian_blur_2d(img: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """The reference's separable Gaussian kernel, reflect-padded, per channel."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k = (pdf / pdf.sum()).to(device=img.device, dtype=img.dtype)
    k2 = torch.mm(k[:, None], k[None, :]).expand(img.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(img, [pad] * 4, mode="reflect"), k2, groups=img.shape[-3])


class SAG(Control):
    def __init__(self, scale: float = 0.75):
        if not isinstance(scale, (int, float)) or scale < 0:
            raise ValueError(f"scale: expected a non-negative number, got {scale!r}")
        self.scale = float(scale)
        self._probs = None

    def setup(self, ctx):
        self._probs = None
        if self.scale == 0:
            return
        if SITE not in ctx.unet.attention_sites():
            raise ValueError("SAG: the UNet has no mid-block self-attention "
                             f"({SITE}) to read the attention map from")
        kind = ctx.scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler: SAG supports epsilon, v_prediction and sample models, got {kind!r}")

    @staticmethod
    def _source(call) -> str:
        return "uncond" if "uncond" in call.slices else "cond"

    def prepare_call(self, ctx, step, call):
        if self.scale == 0:
            return
        whole = call.rows(self._source(call))

        def wrap(inner):
            def read_map(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
                out = inner(attn, hidden_states, encoder_hidden_states, attention_mask)
                rows = call.local(whole)   # the part evaluated now (the loop may split the call)
                if rows.start < rows.stop:
                    if call.window is None or call.window.start <= whole.start:   # the branch's first part
                        self._probs = []
                    h = hidden_states[rows]
                    q, k = attn.split_heads(attn.to_q(h)), attn.split_heads(attn.to_k(h))
                    self._probs.append(attn.probs(q, k, attention_mask))
                return out
            return read_map

        call.add_processor(SITE, wrap)

    def combine(self, ctx, step, preds, pred):
        if self.scale == 0:
            return pred
        call = step.call
        src = self._source(call)
        rows = call.rows(src)
        out = preds[src]
        channels = out.shape[1]
        x = call.x[rows, :channels]   # the model input: alpha * x0 + sigma * eps for every scheduler
        x0, eps = step.x0_eps(out, x)
        degraded = self._degrade(ctx, step, x0, torch.cat(self._probs) if self._probs else None, eps)
        if call.x.shape[1] > channels:   # extra input channels (inpainting): as the branch had them
            degraded = torch.cat([degraded, call.x[rows, channels:]], dim=1)
        text, time_ids, extra = call.branch_inputs(src)
        degraded_pred = ctx.run_unet(degraded, step.t, text, time_ids=time_ids, **extra)
        return pred + self.scale * (out - degraded_pred)

    def teardown(self, ctx):
        self._probs = None

    def _degrade(self, ctx, step, x0, probs, eps):
        """Blur x0 where the map is attended most, then noise it back to this step's level."""
        b, c, lh, lw = x0.shape
        mh, mw = ctx.unet.attention_sites()[SITE].site.grid(lh, lw, len(ctx.unet.config.block_out_channels))
        if probs is None or mh * mw != probs.shape[-1]:
            raise RuntimeError("SAG: the mid-block attention map was not captured for this call")
        mask = probs.mean(1).sum(1) > 1.0
        mask = mask.reshape(b, mh, mw).unsqueeze(1).repeat(1, c, 1, 1).type(probs.dtype)
        mask = F.interpolate(mask, (lh, lw))
        degraded = gaussian_blur_2d(x0, kernel_size=9, sigma=1.0)
        degraded = degraded * mask + x0 * (1 - mask)
        return step.noised(degraded, eps)
