"""pipe.compile(): compiled equals eager (inductor, float32) with processors, residuals and on
SDXL; every control compiles a bounded number of graphs, none per step; uncompile; errors."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from torch._dynamo.utils import counters

import controldiff as cd
from controldiff.compile import LAYERS, graphs_compiled
from pipes import ours
from tiny_models import build_controlnet

TOL = 1e-4
KW = dict(height=64, width=64, scheduler="ddim", output_type="latent")


def _image(seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _compiled_layers(pipe) -> int:
    return sum(LAYERS[type(m)] in m.__dict__ for model in (pipe.unet, pipe.vae) for m in model.modules()
               if type(m) in LAYERS)


@pytest.fixture(scope="module")
def controlnet(tiny_model, tmp_path_factory):
    return cd.load_controlnet(build_controlnet(tiny_model("sd1"), tmp_path_factory.mktemp("cn")))


def _run(pipe, steps=3, **kw):
    return pipe("a cat", num_inference_steps=steps, seed=1, **{**KW, **kw}).images


def _equal_when_compiled(pipe, backend="inductor", **kw):
    """Eager, then compiled: equal within TOL, and the compiled run built or reused graphs."""
    eager = _run(pipe, **kw)
    pipe.compile(backend=backend)
    try:
        got = _run(pipe, **kw)
        assert _compiled_layers(pipe) > 0
    finally:
        pipe.uncompile()
    assert float((got - eager).abs().max()) <= TOL


# One batch size (2) for the SD1 cases, so they share graphs: inductor compiles take seconds each.
SD1_CASES = {
    "cfg": {},
    "pag": dict(guidance_scale=1.0, controls=lambda cn: [cd.PAG(3.0, layers=("mid", "up"))]),
    "controlnet": dict(controls=lambda cn: [cd.ControlNet(cn, _image(), scale=0.8)]),
}


@pytest.mark.parametrize("case", list(SD1_CASES))
def test_compiled_equals_eager_sd1(pipe, controlnet, case):
    kw = dict(SD1_CASES[case])
    if "controls" in kw:
        kw["controls"] = kw["controls"](controlnet)
        plain = _run(pipe, guidance_scale=kw.get("guidance_scale", 7.5))
        assert float((_run(pipe, **kw) - plain).abs().max()) > 1e-3, "the control had no effect"
    _equal_when_compiled(pipe, **kw)


def test_compiled_equals_eager_sdxl_and_decode(tiny_model):
    sdxl = ours(tiny_model("sdxl"))
    _equal_when_compiled(sdxl, steps=2)
    eager = _run(sdxl, steps=1, output_type="np")
    sdxl.compile()
    got = _run(sdxl, steps=1, output_type="np")   # the VAE's layers compiled too
    sdxl.uncompile()
    assert np.abs(got - eager).max() <= TOL


def test_channels_last_then_uncompile(pipe):
    """channels_last=True: weights in that layout, same result; uncompile: eager layers, NCHW weights."""
    eager = _run(pipe)
    n_layers = sum(type(m) in LAYERS for model in (pipe.unet, pipe.vae) for m in model.modules())
    pipe.compile(backend="eager", channels_last=True)
    try:
        assert _compiled_layers(pipe) == n_layers and pipe.compiled["channels_last"]
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        got = _run(pipe)
    finally:
        pipe.uncompile()
    assert float((got - eager).abs().max()) <= TOL
    assert _compiled_layers(pipe) == 0 and pipe.compiled is None
    assert pipe.unet.conv_in.weight.is_contiguous()
    before = graphs_compiled()
    _run(pipe, steps=1)
    assert graphs_compiled() == before   # eager again


CONTROLS = {
    "plain": lambda cn: dict(guidance_scale=1.0),
    "cfg": lambda cn: {},
    "sega": lambda cn: dict(controls=[cd.SEGA([cd.Concept("smiling", scale=4.0, warmup=1)])]),
    "pag": lambda cn: dict(controls=[cd.PAG(2.0, layers=("mid", "up"))]),
    "controlnet": lambda cn: dict(controls=[cd.ControlNet(cn, _image(), scale=0.8, end=0.5)]),
    "deepcache": lambda cn: dict(controls=[cd.DeepCache(2)]),
    "tome": lambda cn: dict(controls=[cd.ToMe(seed=0)]),
    "multidiffusion": lambda cn: dict(controls=[cd.MultiDiffusion(window=64, stride=32)], width=96),
    "and": lambda cn: dict(prompt="a cat AND a dog"),
}


@pytest.fixture(scope="module")
def traced(tiny_model):
    """The SD1 pipe compiled with dynamo only (backend="eager": the same graphs and guards as
    inductor, traced in a fraction of the time), uncompiled after the module."""
    pipe = ours(tiny_model("sd1"))
    torch._dynamo.reset()
    pipe.compile(backend="eager")
    yield pipe
    pipe.uncompile()


@pytest.mark.parametrize("name", list(CONTROLS))
def test_compiles_do_not_grow_with_steps(traced, controlnet, name):
    kw = CONTROLS[name](controlnet)
    prompt = kw.pop("prompt", "a cat")
    breaks = sum(counters["graph_break"].values())
    start = graphs_compiled()
    traced(prompt, num_inference_steps=3, seed=1, **{**KW, **kw})
    first = graphs_compiled() - start
    traced(prompt, num_inference_steps=6, seed=2, **{**KW, **kw})
    assert graphs_compiled() - start == first, f"{name}: a longer run compiled more graphs"
    assert first <= 2 * len({(type(m),) + tuple(p.shape for p in m.parameters())
                             for m in traced.unet.modules() if type(m) in LAYERS})
    assert sum(counters["graph_break"].values()) == breaks


def test_step_count_does_not_change_compiles(pipe):
    """A fresh 3-step and a fresh 6-step run (SEGA, PAG and ControlNet-free composition) compile alike."""
    kw = dict(controls=[cd.SEGA([cd.Concept("smiling", scale=4.0, warmup=2)]), cd.PAG(2.0), cd.ToMe(seed=0)])
    counts = []
    for steps in (3, 6):
        torch._dynamo.reset()
        pipe.compile(backend="eager")
        try:
            start = graphs_compiled()
            _run(pipe, steps=steps, **kw)
            counts.append(graphs_compiled() - start)
        finally:
            pipe.uncompile()
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("kw, match", [
    (dict(mode="fast"), "mode: expected one of"),
    (dict(mode="reduce-overhead"), "mode: 'reduce-overhead' records CUDA graphs"),
    (dict(dynamic="yes"), "dynamic: expected None, True or False"),
    (dict(channels_last=1.0), "channels_last: expected None, True or False"),
    (dict(fullgraph="no"), "fullgraph: expected True or False"),
])
def test_bad_arguments(pipe, kw, match):
    with pytest.raises(ValueError, match=match):
        pipe.compile(**kw)
    assert _compiled_layers(pipe) == 0 and getattr(pipe, "compiled", None) is None
