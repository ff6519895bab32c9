"""TIME model editing (Orgad, Kawar & Belinkov 2023, "Editing Implicit Assumptions in
Text-to-Image Diffusion Models"): Pipeline methods ``edit_model`` and ``reset_model_edits``.

TIME changes an assumption of the model ("a pack of roses" -> blue roses) by editing every
cross-attention key and value projection so that the source prompt's token embeddings s
project where the destination's matching tokens d did (paper, eq. 5):

    W' = argmin  lamb ||W' - W||^2 + sum ||W' s - W d||^2  =  W (I + X)^T,
    X  = argmin  lamb ||X||^2 + ||S X - (D - S)||^2          (ridge regression, S and D stacked)

over the tokens of the source prompt and three augmentations ("A photo of ..."). X depends
only on the embeddings: it is solved once, in float64, and applied to every layer.

Why our own and not diffusers' ``StableDiffusionModelEditingPipeline``: that one looks its
layers up by the class name ``CrossAttention`` (diffusers' class is ``Attention`` now) and keeps
only 768-wide ones, so it edits nothing, and could never edit SD2 (1024) or SDXL (2048). We edit
every ``attn2`` site at whatever width, with the embeddings the UNet sees: the pipeline's own
prompt encoding in plain syntax (SD1/SD2 the last hidden state, as the reference; SDXL both
encoders' penultimate hidden states side by side). Under a LoRA the base Linear is edited and
the values come from the base weights alone, so an edit and a UNet LoRA commute. The original
weights are kept as a copy: ``reset_model_edits`` puts them back exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from .checks import finite_number
from .loading.lora import LoraLayer
from .text.encode import PromptEncoder, check_text

AUGMENTATIONS = ("A photo of ", "An image of ", "A picture of ")  # the reference's with_augs


def _augmented(prompt: str) -> list[str]:
    base = "a" + prompt[1:] if prompt[:1] == "A" else prompt
    return [prompt] + [aug + base for aug in AUGMENTATIONS]


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids with BOS/EOS; "an" counted as "a", as the reference aligns them."""
    a = tokenizer.encode("a ")[1]
    return [a if tokenizer.decode(t) == "an" else t for t in tokenizer(text, verbose=False).input_ids]


def align(tokenizer, source: str, destination: str) -> list[int]:
    """For each position of the source's encoding, the destination position it is mapped to
    (the reference's rule): each source token to its next occurrence in the destination, the
    positions after the source's EOS to those after the last match, then the last position."""
    length = tokenizer.model_max_length
    src, dst = _ids(tokenizer, source), _ids(tokenizer, destination)
    out, j = [], 0
    for t in src:
        while j < len(dst) and dst[j] != t:
            j += 1
        if j == len(dst):
            raise ValueError(f"destination_prompt: must contain the tokens of source_prompt in the same order "
                             f"(TIME maps each to its copy); {tokenizer.decode(t)!r} of {source!r} is missing from "
                             f"{destination!r}")
        out.append(j)
        j += 1
    out += range(j, length)
    return (out + [length - 1] * length)[:length]


def _exact(device: torch.device) -> torch.device:
    """Where to do float64 arithmetic: the device itself, but the CPU for MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


def _prompt(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
    return check_text(value, name)


class ModelEditingMixin:
    """Mixed into :class:`controldiff.Pipeline`: edit_model, reset_model_edits."""

    def _edit_originals(self) -> dict:
        return self.__dict__.setdefault("_time_originals", {})

    def _edit_targets(self, what: str) -> dict[str, nn.Linear]:
        """Every cross-attention to_k/to_v by module path: the Linear, or under a LoRA its base."""
        out = {}
        for name, attn in self.unet.attention_sites().items():
            if attn.site.kind != "cross":
                continue
            for proj in ("to_k", "to_v"):
                m = getattr(attn, proj)
                if isinstance(m, LoraLayer) and m.fused:
                    raise ValueError(f"{what}: a LoRA is fused into {name}.{proj}; call unfuse_lora() first")
                out[f"{name}.{proj}"] = m.lora_base if isinstance(m, LoraLayer) else m
        return out

    def _edit_plan(self, source: str, destination: str) -> tuple[list[str], list[list[int]]]:
        """The texts to encode (sources, then destinations) and each pair's alignment; checked."""
        enc = self.prompt_encoder
        sources, dests = _augmented(enc.expand(source)), _augmented(enc.expand(destination))
        plans = []
        for tokenizer in enc.tokenizers:
            window = tokenizer.model_max_length - 2
            for name, texts in (("source_prompt", sources), ("destination_prompt", dests)):
                for text in texts:
                    n = len(tokenizer(text, verbose=False).input_ids) - 2
                    if n > window:
                        raise ValueError(f"{name}: {text!r} is {n} tokens, more than the text encoder's {window}-token "
                                         f"window (TIME encodes the prompt, and it after each of {AUGMENTATIONS}, "
                                         f"in one window)")
            plans.append([align(tokenizer, s, d) for s, d in zip(sources, dests)])
        if any(p != plans[0] for p in plans):
            raise ValueError("tokenizers: the text encoders' tokenizers split the prompts differently")
        return sources + dests, plans[0]

    @torch.no_grad()
    def edit_model(self, source_prompt: str, destination_prompt: str, lamb: float = 0.1,
                   restart_params: bool = True) -> None:
        """TIME: make ``source_prompt`` act like ``destination_prompt``, which must contain all of
        its words (e.g. "a pack of roses" -> "a pack of blue roses"); both are plain text, read
        without weighting syntax. ``lamb``: regularisation (smaller edits harder).
        ``restart_params``: edit the original weights (True) or the current ones, accumulating
        edits (False). Undo with :meth:`reset_model_edits`."""
        source = _prompt(source_prompt, "source_prompt")
        destination = _prompt(destination_prompt, "destination_prompt")
        lamb = finite_number(lamb, "lamb", minimum=0)
        if not isinstance(restart_params, bool):
            raise ValueError(f"restart_params: expected True or False, got {restart_params!r}")
        texts, alignment = self._edit_plan(source, destination)
        targets = self._edit_targets("edit_model")

        enc = self.prompt_encoder
        embeds = PromptEncoder(enc.tokenizers, enc.text_encoders, sdxl=enc.sdxl, syntax="none").encode(texts).embeds
        n = len(alignment)
        s = embeds[:n].flatten(0, 1).to(_exact(embeds.device), torch.float64)
        d = torch.cat([embeds[n + i, idx] for i, idx in enumerate(alignment)]).to(s.device, torch.float64)
        width = s.shape[1]
        for name, linear in targets.items():
            if linear.in_features != width:
                raise ValueError(f"unet: {name} takes {linear.in_features} features, the text encoders give {width}")
        eye = torch.eye(width, dtype=torch.float64, device=s.device)
        if lamb:
            x = torch.linalg.solve(s.T @ s + lamb * eye, s.T @ (d - s))
        else:  # the least-squares edit closest to W (lamb -> 0); S^T S alone is singular when width > tokens
            x = torch.linalg.pinv(s) @ (d - s)
        m = (eye + x).T

        originals = self._edit_originals()
        for name, linear in targets.items():
            w = linear.weight
            if name not in originals:
                originals[name] = w.detach().clone()
            start = originals[name] if restart_params else w
            exact = _exact(w.device)
            w.copy_((start.to(exact, torch.float64) @ m.to(exact)).to(w.dtype))

    @torch.no_grad()
    def reset_model_edits(self) -> None:
        """Put back the exact weights from before the first edit (a no-op without edits);
        loaded LoRAs stay applied."""
        originals = self.__dict__.get("_time_originals")
        if not originals:
            return
        targets = self._edit_targets("reset_model_edits")
        for name, weight in originals.items():
            targets[name].weight.copy_(weight)
        originals.clear()
