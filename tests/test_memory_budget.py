"""The UNet memory budget: a call's rows (branches, views) evaluated in as many parts as fit
``pipe.memory_budget`` give what one call gives (max abs <= 1e-5), for every control that
depends on a call's row layout; the number of UNet calls grows as the budget shrinks; a
budget too small for one row, or not a size, is refused before any UNet runs; a wide
panorama under a small budget peaks lower than without one."""
from __future__ import annotations

import ctypes
import gc
import math

import pytest
import torch

import controldiff as cd
from controldiff.loading.control_models import load_controlnet, load_t2i_adapter
from controldiff.memory import parse_budget, unet_row_bytes
from pictures import photo
from pipes import ours
from test_t2i_adapter import SD1_ADAPTERS, image, make_adapter
from tiny_models import build_controlnet

TOL = 1e-5   # images in [0, 1]; final latents: relative to their largest value
KW = dict(num_inference_steps=3, output_type="np", height=64, width=64)


def row_bytes(pipe, height: int, width: int) -> int:
    f = pipe.vae.latent_factor
    return unet_row_bytes(pipe.unet.config, height // f, width // f, pipe.unet.dtype.itemsize)


class Calls:
    """Counts UNet evaluations while active."""

    def __init__(self, unet):
        self.unet, self.n = unet, 0

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run(pipe, budget, *args, **kw):
    """((images, final latents), UNet calls) of one generation under ``budget``."""
    pipe.memory_budget = budget
    seen = {}
    try:
        with Calls(pipe.unet) as calls:
            images = pipe(*args, callback=lambda i, t, x: seen.update(x=x.clone()), **{**KW, **kw}).images
    finally:
        pipe.memory_budget = None
    return (torch.as_tensor(images), seen["x"]), calls.n


def assert_split_equals_one_call(pipe, *args, rows_per_part=(1, 3), view=None, **kw):
    """Unlimited budget (one call per step) against budgets of ``rows_per_part`` rows at the
    call's latent size (``view``: a view's pixel size; default the canvas)."""
    h, w = view or (kw.get("height", KW["height"]), kw.get("width", KW["width"]))
    whole, n_whole = run(pipe, math.inf, *args, **kw)
    for rows in rows_per_part:
        split, n_split = run(pipe, rows * row_bytes(pipe, h, w), *args, **kw)
        diff = float((split[0] - whole[0]).abs().max())
        assert diff <= TOL, f"{rows} rows a part: images max abs {diff}"
        rel = float((split[1] - whole[1]).abs().max() / whole[1].abs().max())
        assert rel <= TOL, f"{rows} rows a part: latents max abs {rel} of their largest value"
        assert n_split > n_whole or rows > 1, f"one row a part: {n_split} UNet calls, unsplit {n_whole}"


@pytest.fixture(scope="module")
def sd1(tiny_model):
    return ours(tiny_model("sd1"))


def concepts():
    return [cd.Concept("smiling", scale=5.0, warmup=0), cd.Concept("glasses", scale=3.0, reverse=True, warmup=1),
            cd.Concept("a hat", scale=4.0, warmup=0, threshold=0.5)]


CASES = {
    "cfg": (dict(num_images_per_prompt=2), lambda pipe, tmp: []),
    "sega-3-concepts": ({}, lambda pipe, tmp: [cd.SEGA(concepts())]),
    "regions-2": ({}, lambda pipe, tmp: [cd.Regions([cd.Region("a cat", box=(0, 0, 40, 64)),
                                                     cd.Region("a dog", box=(24, 0, 64, 64), weight=2.0)])]),
    "pag-mid-and-down": (dict(num_images_per_prompt=2),
                         lambda pipe, tmp: [cd.PAG(scale=3.0, layers=("mid", "down_blocks.0"))]),
    "sag": (dict(num_images_per_prompt=2), lambda pipe, tmp: [cd.SAG(scale=0.75)]),
    "sag-pag": ({}, lambda pipe, tmp: [cd.SAG(scale=0.75), cd.PAG(scale=2.0)]),
    "fabric": ({}, lambda pipe, tmp: [cd.FABRIC(liked=[photo(1)], disliked=[photo(2)], feedback_start_ratio=0.0)]),
    "deepcache": (dict(num_inference_steps=5), lambda pipe, tmp: [cd.DeepCache(cache_interval=2, cache_branch_id=1)]),
    "deepcache-sag": (dict(num_inference_steps=5), lambda pipe, tmp: [cd.DeepCache(cache_interval=2,
                                                                                    cache_branch_id=4), cd.SAG()]),
    "tome-seeded": (dict(num_images_per_prompt=2), lambda pipe, tmp: [cd.ToMe(ratio=0.5, seed=3)]),
    "tome-pag": ({}, lambda pipe, tmp: [cd.ToMe(ratio=0.5, seed=1), cd.PAG(scale=2.0)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_split_equals_one_call(sd1, tmp_path, name):
    kw, controls = CASES[name]
    assert_split_equals_one_call(sd1, "a cat", seed=1, controls=controls(sd1, tmp_path), **kw)


def test_deepcache_still_caches_when_split(sd1):
    """Split into one row a part, DeepCache's cached steps still reuse features (the result
    is not the uncached one) and run fewer mid blocks."""
    one = row_bytes(sd1, 64, 64)
    mids = Calls(sd1.unet.mid_block)
    with mids:
        cached, _ = run(sd1, one, "a cat", seed=1, num_inference_steps=5, controls=[cd.DeepCache(cache_interval=2)])
    full_mids = mids.n
    with mids:
        plain, _ = run(sd1, one, "a cat", seed=1, num_inference_steps=5)
    assert full_mids < mids.n - full_mids
    assert float((cached[0] - plain[0]).abs().max()) > 1e-3


def test_and_prompts(sd1):
    assert_split_equals_one_call(sd1, "a cat AND a dog:0.5 AND a hat", seed=2, negative_prompt="blurry")


def test_controlnet(sd1, tiny_model, tmp_path):
    net = load_controlnet(build_controlnet(tiny_model("sd1"), tmp_path / "cn"))
    for guess in (False, True):
        assert_split_equals_one_call(sd1, "a cat", seed=3, controls=[cd.ControlNet(net, photo(4), guess_mode=guess)])


def test_t2i_adapter(sd1, tmp_path):
    make_adapter(tmp_path / "full", **SD1_ADAPTERS["full"])
    adapter = load_t2i_adapter(tmp_path / "full")
    assert_split_equals_one_call(sd1, "a cat", seed=4, controls=[cd.T2IAdapter(adapter, image(5, size=(64, 64)))])


def test_multidiffusion_views(sd1):
    """Views of all groups, with and without the control's own view batches, with SEGA."""
    for batch in (None, 3):
        assert_split_equals_one_call(sd1, "a river", seed=5, width=160, view=(64, 64), rows_per_part=(1, 4),
                                     controls=[cd.MultiDiffusion(window=64, stride=32, batch_size=batch),
                                               cd.SEGA(concepts()[:1])])


def test_sdxl(tiny_model):
    pipe = ours(tiny_model("sdxl"))
    assert_split_equals_one_call(pipe, "a cat", seed=6, negative_prompt="a dog",
                                 controls=[cd.SEGA(concepts()[:2]), cd.PAG(scale=2.0)])


def test_calls_grow_as_the_budget_shrinks(sd1):
    """CFG with 2 images per prompt: 4 rows a step, in ceil(4 / rows a part) calls."""
    one = row_bytes(sd1, 64, 64)
    _, steps = run(sd1, math.inf, "a cat", seed=0, num_images_per_prompt=2)   # one call a timestep
    assert steps == KW["num_inference_steps"] + 1   # (PNDM's PLMS runs one timestep more)
    for rows, calls in ((4, 1), (3, 2), (2, 2), (1, 4)):
        _, n = run(sd1, rows * one + one // 2, "a cat", seed=0, num_images_per_prompt=2)
        assert n == calls * steps, (rows, n)


def test_strings_and_automatic_budget(sd1):
    assert parse_budget("4GiB") == 4 * 2**30 and parse_budget("512MB") == 512 * 10**6 and parse_budget(1000) == 1000
    assert parse_budget(" 1.5 kib ") == 1536
    whole, _ = run(sd1, math.inf, "a cat", seed=0)
    auto, n = run(sd1, None, "a cat", seed=0)   # half the free memory: the tiny model's call fits
    assert n == KW["num_inference_steps"] + 1 and torch.equal(auto[1], whole[1])


def test_budget_below_one_row_is_refused_before_any_unet_call(sd1):
    need = row_bytes(sd1, 64, 64)
    with Calls(sd1.unet) as calls:
        with pytest.raises(ValueError, match=r"memory_budget: .* cannot hold one row .* 8x8 latents"):
            run(sd1, need - 1, "a cat", seed=0)
        # views: the window's size counts, not the canvas's
        with pytest.raises(ValueError, match=r"memory_budget: .* 8x8 latents"):
            run(sd1, need - 1, "a cat", seed=0, width=256, controls=[cd.MultiDiffusion(window=64, stride=64)])
    assert calls.n == 0
    run(sd1, need, "a cat", seed=0, width=256, controls=[cd.MultiDiffusion(window=64, stride=64)])


@pytest.mark.parametrize("bad", ["lots", "-1GiB", 0, -5, True, [1], "4 parsecs"])
def test_bad_budget_is_named_before_work(pipe, no_work, bad):
    pipe.memory_budget = bad
    try:
        with pytest.raises(ValueError, match="pipe.memory_budget: expected"):
            pipe("a cat", **KW)
    finally:
        pipe.memory_budget = None


def _peak_rss(fn) -> int:
    """Peak resident bytes above the start while ``fn`` runs (the kernel's VmHWM, reset first).
    tracemalloc does not see torch's CPU tensors (they bypass Python's allocator) and torch
    keeps no CPU allocator statistics, so the kernel's count is the one that sees them."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    base = status("VmRSS:")
    fn()
    return status("VmHWM:") - base


def test_wide_panorama_peaks_lower_under_a_small_budget(sd1):
    """16 views of 256x256 (32 rows with CFG): the whole call against 2 rows a part."""
    kw = dict(height=256, width=4096, num_inference_steps=1, output_type="latent",
              controls=[cd.MultiDiffusion(window=256, stride=256)])
    small = 2 * row_bytes(sd1, 256, 256)
    run(sd1, small, "a river", seed=0, **kw)   # warm-up
    split = _peak_rss(lambda: run(sd1, small, "a river", seed=0, **kw))
    whole = _peak_rss(lambda: run(sd1, math.inf, "a river", seed=0, **kw))
    assert split < whole / 3, (split / 2**20, whole / 2**20)
    assert whole > 16 * row_bytes(sd1, 256, 256)   # the estimate is not far above what one call took
