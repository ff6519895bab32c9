"""The loop's extension points: what a control may add to one generation.

A control overrides only the hooks it needs. The loop calls them in the order the
controls were given; every control sees the same ``Context``.

- ``setup`` / ``teardown``: validate against the model and precompute (encode images,
  prompts); undo and release after the loop (always run, failures included).
- ``branches``: named model evaluations it needs this step; the loop batches the
  branches of all controls into one model call.
- ``prepare_call``: adjust the batched model call (add residuals, attention processors).
- ``combine``: turn the branch predictions into the model prediction (CFG first,
  then guidance terms added by other controls); ``Step.x0_eps`` converts it.
- ``before_step`` / ``after_step``: latent operators around the scheduler step.
- ``step_views``: split the canvas into views denoised separately and merged
  (MultiDiffusion); at most one control may do this.

Spatial controls (ControlNet images, masks, concat channels) crop their tensors with
``crop_views(tensor, call.views, scale)``: inside a view-split step the batch holds
views side by side (view-major within each branch).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

from ..schedulers.prediction import to_output, x0_eps
from ..text.encode import TextCond
from ..text.tokens import find_tokens


@dataclass
class Branch:
    """One model evaluation over the whole latent batch.

    ``text`` conditions it; ``concat`` (optional) replaces the context's extra input
    channels for this branch (e.g. an unconditional image branch).
    """

    name: str
    text: TextCond
    concat: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class View:
    """A window of the latent canvas: rows h0:h1, columns w0:w1.

    Columns may run past the right edge (w1 > width): the window then wraps around to
    the left edge, as in circular panoramas.
    """

    h0: int
    h1: int
    w0: int
    w1: int

    def crop(self, t: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """The window of ``t`` (latent coordinates times ``scale`` for pixel tensors)."""
        h0, h1, w0, w1 = self.h0 * scale, self.h1 * scale, self.w0 * scale, self.w1 * scale
        width = t.shape[-1]
        if w1 <= width:
            return t[..., h0:h1, w0:w1]
        return torch.cat([t[..., h0:h1, w0:], t[..., h0:h1, : w1 - width]], dim=-1)

    def add_into(self, canvas: torch.Tensor, value: torch.Tensor) -> None:
        """canvas[window] += value, wrapping around like :meth:`crop`."""
        width = canvas.shape[-1]
        if self.w1 <= width:
            canvas[..., self.h0:self.h1, self.w0:self.w1] += value
            return
        split = width - self.w0
        canvas[..., self.h0:self.h1, self.w0:] += value[..., :split]
        canvas[..., self.h0:self.h1, : self.w1 - width] += value[..., split:]


def crop_views(t: Optional[torch.Tensor], views: Optional[list], scale: int = 1) -> Optional[torch.Tensor]:
    """``t`` (batch B) for a call over ``views``: the crops stacked view-major (V*B)."""
    if t is None or views is None:
        return t
    return torch.cat([v.crop(t, scale) for v in views])


@dataclass
class ModelCall:
    """One batched UNet evaluation: every branch of this step, side by side.

    ``slices[name]`` is the batch range of a branch. ``views`` is None for the whole
    canvas, else the views each branch holds side by side. Controls may add UNet keyword
    arguments (``kwargs``) or attention processors (``processors``, by site name).

    The loop may evaluate the rows in parts that fit its memory budget; ``window`` is then the
    part being evaluated (call rows), so a processor indexes its ``hidden_states`` with
    ``call.local(call.rows(name))``.
    """

    x: torch.Tensor
    t: torch.Tensor
    embeds: torch.Tensor
    branches: list
    slices: Dict[str, slice]
    views: Optional[list] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    processors: Dict[str, Any] = field(default_factory=dict)
    window: Optional[slice] = None   # the rows being evaluated now (None: all, or not evaluating)

    def add_processor(self, site: str, wrap: Callable[[Callable], Callable]) -> None:
        """Attach at ``site`` the processor ``wrap(inner)``, where ``inner`` is the processor
        another control attached there before (or the default computation). Wrapping
        instead of replacing lets several controls use the same site in one call (e.g.
        PAG perturbs its rows while SAG reads the maps of its own rows)."""
        self.processors[site] = wrap(self.processors.get(site, default_processor))

    def rows(self, name: str) -> slice:
        """Batch rows of branch ``name`` in this call."""
        return self.slices[name]

    def local(self, rows: slice) -> slice:
        """Call rows ``rows`` within the part being evaluated, in that part's own rows
        (empty when the part holds none of them)."""
        if self.window is None:
            return rows
        lo, hi = max(rows.start, self.window.start), min(rows.stop, self.window.stop)
        return slice(lo - self.window.start, max(lo, hi) - self.window.start)

    def branch_inputs(self, name: str) -> tuple[TextCond, Optional[torch.Tensor], dict]:
        """Branch ``name``'s text, SDXL time ids and other UNet keyword arguments (residuals
        added by other controls), its rows only: what a control re-running that branch through
        ``ctx.run_unet`` passes (SAG, CLIP guidance)."""
        rows = self.rows(name)
        added = self.kwargs.get("added_cond_kwargs")
        text = TextCond(self.embeds[rows], None if added is None else added["text_embeds"][rows])
        time_ids = None if added is None else added["time_ids"][rows]
        extra = {k: rows_of(v, rows) for k, v in self.kwargs.items() if k != "added_cond_kwargs"}
        return text, time_ids, extra


def rows_of(value, rows: slice):
    """The batch rows of a UNet keyword argument (residual tensors, lists or dicts of them;
    an object with a ``rows_of(rows)`` method gives its own, e.g. DeepCache's per-part caches)."""
    if hasattr(value, "rows_of"):
        return value.rows_of(rows)
    if torch.is_tensor(value):
        return value[rows]
    if isinstance(value, (list, tuple)):
        return type(value)(rows_of(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: rows_of(v, rows) for k, v in value.items()}
    return value


def default_processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
    """The attention module's own computation (SDPA)."""
    return attn.default(hidden_states, encoder_hidden_states, attention_mask)


@dataclass
class Step:
    """One step of the loop. The model input of this step is ``alpha * x0 + sigma * eps``
    for every scheduler (k-diffusion schedulers scale their latents into this form), so
    :meth:`x0_eps` and :meth:`to_prediction` work on ``call.x`` whatever the scheduler."""

    index: int          # 0-based position in this run's timesteps
    t: torch.Tensor     # the scheduler timestep
    count: int          # how many timesteps this run has
    alpha: Any = 1.0    # sqrt(alpha_bar) of this step's noise level (float32 scalar tensor)
    sigma: Any = 0.0    # sqrt(1 - alpha_bar)
    prediction_type: str = "epsilon"   # what the model predicts: "epsilon", "sample" or "v_prediction"
    call: Optional[ModelCall] = None   # the call being combined (set by the loop before combine)

    def x0_eps(self, pred: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a model prediction ``pred`` at model input ``x`` (latent channels)."""
        return x0_eps(self.prediction_type, pred, x, self._cast(self.alpha, x), self._cast(self.sigma, x))

    def to_prediction(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The model prediction that :meth:`x0_eps` turns into (x0, eps)."""
        return to_output(self.prediction_type, x0, eps, self._cast(self.alpha, x0), self._cast(self.sigma, x0))

    def noised(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The model input at this step's level: ``alpha * x0 + sigma * eps``."""
        return self._cast(self.alpha, x0) * x0 + self._cast(self.sigma, x0) * eps

    @staticmethod
    def _cast(v, like: torch.Tensor):
        return v.to(like.device, like.dtype) if torch.is_tensor(v) else v


@dataclass
class Context:
    """What every control can read: the model, the batch and the conditioning."""

    unet: Any
    scheduler: Any
    batch: int                               # latent batch size (prompts x images per prompt)
    text: Dict[str, TextCond]                # "cond", "uncond" (when guidance is on), ...
    generator: Any = None
    concat: Optional[torch.Tensor] = None    # extra UNet input channels, appended to every branch
    time_ids: Optional[torch.Tensor] = None  # SDXL micro-conditioning for "cond" (batch, 6)
    encode_prompt: Optional[Callable[[Any], TextCond]] = None  # prompt(s) -> TextCond, placed and repeated like "cond"
    vae: Any = None
    info: Any = None                          # loading.family.ModelInfo
    height: int = 0                           # image size in pixels
    width: int = 0
    timesteps: Optional[torch.Tensor] = None  # this run's timesteps (fewer than asked for img2img)
    guidance_scale: float = 1.0               # classifier-free guidance scale (<= 1: off)
    uncond_time_ids: Optional[torch.Tensor] = None  # SDXL micro-conditioning for "uncond" (None: as "cond")
    decode_wrap: int = 0                      # latent columns wrapped around each side when decoding
    decoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # see decode()
    encoder: Optional[Callable[..., torch.Tensor]] = None             # see encode_image()
    tokenize: Optional[Callable[[str], list]] = None  # text -> token ids (first tokenizer, no BOS/EOS)
    extras: Dict[str, Any] = field(default_factory=dict)  # free for user controls to share state
    step_kwargs: Dict[str, Any] = field(default_factory=dict)  # this run's extra scheduler.step arguments (eta), set by the loop
    controls: tuple = ()                      # this run's controls in order (set before setup: refusing combinations)
    memory_budget: Optional[int] = None       # bytes one UNet call may use (None: no limit); see memory.py

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def steps(self) -> int:
        """How many timesteps this run has."""
        return 0 if self.timesteps is None else len(self.timesteps)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] with the VAE (differentiable: run it under
        ``torch.enable_grad()`` to take gradients through it)."""
        if self.decoder is None:
            raise ValueError("ctx.decode: this context has no VAE decoder")
        return self.decoder(latents)

    def encode_image(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> scaled latents, sampling the VAE posterior
        with ``generator`` as diffusers does (differentiable)."""
        if self.encoder is None:
            raise ValueError("ctx.encode_image: this context has no VAE encoder")
        return self.encoder(images, generator)

    def token_indices(self, word: str, branch: str = "cond", row: int = 0) -> list[int]:
        """Positions in branch ``branch``'s embeddings (row ``row``) of the tokens of ``word``
        (every occurrence; a word of several tokens gives all of them). Position 0 is the
        first chunk's BOS, as in the reference pipelines' ``token_indices``."""
        if self.tokenize is None or self.text[branch].ids is None:
            raise ValueError("ctx.token_indices: this context keeps no token ids")
        return find_tokens(self.text[branch].ids[row].tolist(), self.tokenize(word))

    def run_unet(self, x: torch.Tensor, t, text: TextCond, time_ids: Optional[torch.Tensor] = None,
                 processors: Optional[dict] = None, **kwargs) -> torch.Tensor:
        """One extra UNet evaluation (for controls that re-run the model, e.g. SAG).

        ``text`` and ``time_ids`` must have x's batch size; SDXL's added conditioning
        is filled in from them.
        """
        if text.pooled is not None:
            if time_ids is None:  # "cond"'s ids; every row of a run has the same ones
                n, k = x.shape[0], self.time_ids.shape[0]
                time_ids = self.time_ids.repeat(n // k, 1) if n % k == 0 else self.time_ids[:1].expand(n, -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": text.pooled, "time_ids": time_ids}
        with self.unet.attention_processors(processors or {}):
            return self.unet(x.to(self.dtype), t, text.embeds, **kwargs).to(x.dtype)  # float32 latents, any UNet dtype


def plain(value: Any) -> Any:
    """``value`` as plain data for metadata: numbers, strings, lists and dicts; a model by
    its name (``source``, a loader-set path, else its config's ``_name_or_path``, else its
    class); images and tensors are left out (None)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [plain(v) for v in value]
        return None if any(p is None and v is not None for p, v in zip(items, value)) else items
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return settings((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, torch.nn.Module):
        config = getattr(value, "config", None) or {}
        name = getattr(value, "source", None) or (config.get("_name_or_path") if isinstance(config, dict) else None)
        return str(name) if name else type(value).__name__
    return None


def settings(pairs) -> dict:
    """(name, value) pairs as plain data; pairs whose value has no plain form (images,
    tensors) are dropped, a None value is kept."""
    out = {}
    for name, value in pairs:
        p = plain(value)
        if p is not None or value is None:
            out[name] = p
    return out


class Control:
    """Base class: every hook is optional and does nothing by default."""

    def describe(self) -> dict:
        """The control's name and settings, for metadata (``out.settings["controls"]``):
        every constructor argument kept as a public attribute of the same name, as plain
        data (:func:`plain`; images and tensors left out). Override to say more."""
        names = [p.name for p in inspect.signature(type(self).__init__).parameters.values()
                 if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and hasattr(self, p.name)]
        return {"name": type(self).__name__, **settings((n, getattr(self, n)) for n in names)}

    def setup(self, ctx: Context) -> None:
        pass

    def teardown(self, ctx: Context) -> None:
        """Undo what ``setup`` did (restore weights, drop caches); always run after the loop,
        also when it fails or is cancelled, for every control whose setup ran."""

    def default_size(self) -> Optional[tuple[int, int]]:
        """(height, width) in pixels this control suggests when the caller gives none
        (e.g. a ControlNet's image size, as the reference pipelines do)."""
        return None

    def branches(self, ctx: Context, step: Step) -> list[Branch]:
        return []

    def prepare_call(self, ctx: Context, step: Step, call: "ModelCall") -> None:
        pass

    def combine(self, ctx: Context, step: Step, preds: Dict[str, torch.Tensor], pred: torch.Tensor) -> torch.Tensor:
        """``pred``: the model prediction combined so far (CFG's first); return the new one."""
        return pred

    def before_step(self, ctx: Context, step: Step, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def after_step(self, ctx: Context, step: Step, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def step_views(self, ctx: Context, step: Step, latents: torch.Tensor,
                   denoise: Callable[[torch.Tensor, Optional[list]], torch.Tensor]) -> Optional[torch.Tensor]:
        """Take over one step by views: ``denoise(view_latents, views)`` evaluates, combines
        and steps the scheduler on the stacked crops; return the merged latents."""
        return None
