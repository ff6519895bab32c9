"""New tokens learnt as embeddings, for textual inversion's token and Custom Diffusion's
modifier tokens. A token goes into every tokenizer of the model (SDXL: both). In every text
encoder its row starts from its initializer token's row in that same encoder. Only the new
rows are trainable; the other rows sit beside them as a frozen tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

__all__ = ["NewTokens"]


class _TokenEmbedding(nn.Module):
    """A token embedding whose original rows are a frozen tensor and whose last rows (the
    new tokens') are the trainable parameter ``new``."""

    def __init__(self, weight: torch.Tensor, count: int):
        super().__init__()
        self.register_buffer("frozen", weight[:-count].detach().clone(), persistent=False)
        self.new = nn.Parameter(weight[-count:].detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.frozen, self.new])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


def _embeddings_owner(encoder: nn.Module) -> nn.Module:
    return (encoder.text_model if hasattr(encoder, "text_model") else encoder).embeddings


class NewTokens:
    """``tokens``, each started from the one-token word ``initializers[i]``; ``argument``:
    the option that names the tokens in errors."""

    def __init__(self, tokens: Sequence[str], initializers: Sequence[str], argument: str):
        self.tokens, self.initializers, self.argument = list(tokens), list(initializers), argument
        self.layers: dict[str, _TokenEmbedding] = {}  # text encoder component -> its token embedding

    def check(self, model) -> None:
        """The checks of :meth:`bind`, run on the model folder's tokenizers so that they fail
        before any weight is read."""
        from ..loading.folder import TEXT_ENCODER_SLOTS, TOKENIZER_SLOTS, load_tokenizer, read_configs

        slots = read_configs(model).slots
        self._add([load_tokenizer(Path(model) / t) for s, t in zip(TEXT_ENCODER_SLOTS, TOKENIZER_SLOTS) if s in slots])

    def _add(self, tokenizers) -> list[list[int]]:
        """Add the tokens to each tokenizer after the scripts' checks. Returns, for each
        tokenizer, the id of each token's initializer."""
        ids = []
        for i, tokenizer in enumerate(tokenizers):
            which = f"tokenizer {i + 1}" if len(tokenizers) > 1 else "the tokenizer"
            known = [t for t in self.tokens if t in tokenizer.get_vocab()]
            if known:
                raise ValueError(f"{self.argument}: {known[0]!r} is already in {which}'s vocabulary; pass a token "
                                 "it does not know (e.g. '<my-thing>')")
            inits = []
            for word in self.initializers:
                found = tokenizer.encode(word, add_special_tokens=False)
                if len(found) != 1:
                    raise ValueError(f"initializer_token: {word!r} is {len(found)} tokens for {which} "
                                     f"({tokenizer.convert_ids_to_tokens(found)}); pass a word that is one token")
                inits.append(found[0])
            size = len(tokenizer)
            tokenizer.add_tokens(self.tokens)
            if tokenizer.convert_tokens_to_ids(self.tokens) != list(range(size, size + len(self.tokens))):
                raise ValueError(f"{self.argument}: {self.tokens} could not be added to {which} as new tokens, "
                                 "each once")
            ids.append(inits)
        return ids

    def bind(self, tokenizers) -> None:
        """Add the tokens to the run's tokenizers (before :meth:`attach`)."""
        tokenizers = [t for t in tokenizers if t is not None]
        self._init_ids = self._add(tokenizers)
        self._vocab = [len(t) for t in tokenizers]

    def attach(self, roots: dict[str, nn.Module]) -> list[nn.Parameter]:
        """Resize each text encoder's token embedding, start the new rows at their
        initializers' rows and keep only them trainable; return them. transformers' resize
        initialises the new rows from the global RNG first, as the scripts' resize does."""
        params, n = [], len(self.tokens)
        encoders = [(k, m) for k, m in roots.items() if k != "unet" and m is not None]
        for (component, encoder), inits, size in zip(encoders, self._init_ids, self._vocab):
            encoder.resize_token_embeddings(size)
            weight = encoder.get_input_embeddings().weight.data
            with torch.no_grad():
                for row, init in zip(range(size - n, size), inits):
                    weight[row] = weight[init].clone()
            layer = _TokenEmbedding(weight, n)
            _embeddings_owner(encoder).token_embedding = layer
            self.layers[component] = layer
            params.append(layer.new)
        return params

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{text encoder component: its (tokens, width) rows}``."""
        return {c: layer.new.detach().clone().contiguous() for c, layer in self.layers.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy the rows back (the caller has checked the keys and shapes)."""
        for c, layer in self.layers.items():
            layer.new.copy_(state[c])

    def rows(self) -> list[torch.Tensor]:
        """The learnt (tokens, width) rows of each text encoder, float32, for saving."""
        return [layer.new.detach().float().cpu().contiguous() for layer in self.layers.values()]
