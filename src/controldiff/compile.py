"""``pipe.compile()``: torch.compile the models' hook-free layers; the hooks stay Python.

Why not one graph of the whole UNet: controls change it from call to call - processors
attached for one evaluation (PAG, SAG, FABRIC, Attend-and-Excite: new closures every
step), a token-merge hook (ToMe), keyword arguments that come and go (ControlNet and T2I
residuals, SDXL's added conditioning, DeepCache's skip cache) and batches that grow and
shrink (SEGA warm-up, AND parts, CFG off). A whole-UNet graph guards on all of that and
recompiles whenever it changes: every step, for per-call processors.

So the graphs are the layers that hold the arithmetic and no hook: resnets, feed-forwards
and the default attention (``Attention.default``, which processors call too, so PAG's
unperturbed rows run compiled). One compiled function per layer class is installed on
each instance, and layers of one shape share its graph. Processors, token merging,
residuals and caching run in Python between the layers, as in eager, so a composition
compiles once per layer shape (and once more when a batch or token count first changes,
with the changed sizes then dynamic) and never per step.
"""
from __future__ import annotations

import types
from typing import Callable, Optional, Union

import torch
from torch import nn

from .models.attention import Attention
from .models.blocks import ResnetBlock2D
from .models.transformer import FeedForward

# The compiled layers: class -> the method replaced on each instance of exactly that class.
LAYERS = {ResnetBlock2D: "forward", FeedForward: "forward", Attention: "default"}
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def graphs_compiled() -> int:
    """Graphs torch.compile has built in this process (dynamo's counter): to measure recompiles."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _layer_shape(module: nn.Module) -> tuple:
    return (type(module),) + tuple(tuple(p.shape) for p in module.parameters())


def compile_model(model: nn.Module, *, mode: Optional[str] = None, dynamic: Optional[bool] = None,
                  fullgraph: bool = False, backend: Union[str, Callable] = "inductor",
                  options: Optional[dict] = None) -> int:
    """Install compiled :data:`LAYERS` methods on every such layer of ``model`` (a UNet, VAE or
    ControlNet); returns how many. The arguments are torch.compile's; :func:`uncompile_model`
    removes them.

    Dynamo keeps ``recompile_limit`` (default 8) graphs per function, and here one function
    serves every layer shape of its class; the limit is raised, process-wide, to 8 per shape
    so each shape keeps the default budget."""
    compiled = {cls: torch.compile(getattr(cls, name), mode=mode, dynamic=dynamic, fullgraph=fullgraph,
                                   backend=backend, options=options) for cls, name in LAYERS.items()}
    layers = [m for m in model.modules() if type(m) in LAYERS]
    for m in layers:
        m.__dict__[LAYERS[type(m)]] = types.MethodType(compiled[type(m)], m)
    shapes = {_layer_shape(m) for m in layers}
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 8 * len(shapes))
    return len(layers)


def uncompile_model(model: nn.Module) -> None:
    """Back to the eager layer methods (compiled graphs stay in dynamo's cache for a later compile)."""
    for m in model.modules():
        if type(m) in LAYERS:
            m.__dict__.pop(LAYERS[type(m)], None)


def _check(device: torch.device, mode, dynamic, channels_last, fullgraph) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError(f"mode: 'reduce-overhead' records CUDA graphs, which need the pipeline on a CUDA device "
                         f"(it is on {device.type}); use mode=None or 'max-autotune-no-cudagraphs'")
    for name, value in (("dynamic", dynamic), ("channels_last", channels_last)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name}: expected None, True or False, got {value!r}")
    if not isinstance(fullgraph, bool):
        raise ValueError(f"fullgraph: expected True or False, got {fullgraph!r}")


def compile_pipeline(pipe, mode: Optional[str] = None, dynamic: Optional[bool] = None,
                     channels_last: Optional[bool] = None, fullgraph: bool = False,
                     backend: Union[str, Callable] = "inductor") -> None:
    """What ``pipe.compile()`` does: the UNet's and the VAE's layers compiled (:func:`compile_model`).

    ``mode``, ``dynamic``, ``fullgraph`` and ``backend`` are torch.compile's (``dynamic=None``:
    sizes are specialised until one changes). ``mode="reduce-overhead"`` (CUDA graphs) is
    refused off CUDA, and untested on CUDA. ``channels_last=True`` puts the UNet's weights in
    that layout and lets inductor pick it inside its graphs (``layout_optimization``, on by
    default in inductor); False keeps both NCHW. None: channels_last where it was measured to
    help, which is nowhere yet: on the 2-core CPU of benchmarks/RESULTS.md it slowed the UNet,
    eager and compiled; on CUDA in half precision diffusers recommends it for convolutions,
    untested here (pass True)."""
    _check(pipe.device, mode, dynamic, channels_last, fullgraph)
    layout = bool(channels_last)
    how = dict(mode=mode, options=None)
    if backend == "inductor":   # torch.compile takes a mode or options: the mode's options, plus ours
        from torch._inductor import list_mode_options

        how = dict(mode=None, options={**list_mode_options(mode or "default", dynamic),
                                       "layout_optimization": layout})
    uncompile_pipeline(pipe)
    if layout:
        pipe.unet.to(memory_format=torch.channels_last)
    for model in (pipe.unet, pipe.vae):
        compile_model(model, dynamic=dynamic, fullgraph=fullgraph, backend=backend, **how)
    pipe.compiled = dict(mode=mode, dynamic=dynamic, channels_last=layout, fullgraph=fullgraph, backend=backend)


def uncompile_pipeline(pipe) -> None:
    """Undo :func:`compile_pipeline`: eager layers, the UNet's weights contiguous again."""
    settings = getattr(pipe, "compiled", None)
    if settings is None:
        return
    for model in (pipe.unet, pipe.vae):
        uncompile_model(model)
    if settings["channels_last"]:
        pipe.unet.to(memory_format=torch.contiguous_format)
    pipe.compiled = None
