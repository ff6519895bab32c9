"""ToMe: parity with ``tomesd.apply_patch`` on the diffusers pipelines (SD1, SD2, SDXL; with
ControlNet, SEGA, MultiDiffusion, PAG, SAG, Attend-and-Excite and FABRIC), the odd-batch rule,
seeding, teardown, refused combinations and argument errors.

tomesd 0.1.3 runs unchanged on diffusers 0.42.1. Its random destinations come from a
generator forked from the global torch generator at its first merge after ``apply_patch``:
the reference runs seed the global generator with ``torch.manual_seed(s)`` and ours takes
``ToMe(seed=s)``.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import PIL.Image
import pytest
import torch
import tomesd

import controldiff as cd
from controldiff.controls.attend_excite import AttendAndExcite
from controldiff.controls.fabric import FABRIC
from controldiff.controls.multidiffusion import MultiDiffusion
from controldiff.controls.pag import PAG
from controldiff.controls.sag import SAG
from controldiff.controls.sega import SEGA, Concept
from controldiff.controls.tome import ToMe, bipartite_merge
from controldiff.models.transformer import BasicTransformerBlock

import diffusers  # the oracle
from pipes import ours, reference
from tiny_models import build_controlnet

TOL = 1e-4
SEED = 11   # the ToMe generator's seed (reference: the global generator's)
KW = dict(num_inference_steps=3, output_type="np", height=64, width=64)


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


@contextlib.contextmanager
def patched(ref, **tome):
    """The reference pipeline under tomesd, its generator forked from a seeded global one."""
    tomesd.apply_patch(ref, **tome)
    torch.manual_seed(SEED)
    try:
        yield
    finally:
        tomesd.remove_patch(ref)


def compare(run_ref, run_ours, tome: dict, label: str):
    """Reference under tomesd vs ours with ToMe(**tome); ours also without ToMe (it must matter)."""
    with patched(run_ref.ref, **tome):
        expected = np.asarray(run_ref())
    got = np.asarray(run_ours([ToMe(**tome, seed=SEED)]))
    plain = np.asarray(run_ours([]))
    assert np.abs(got - plain).max() > 1e-3, f"{label}: ToMe had no effect"
    diff = float(np.abs(got - expected).max())
    print(f"ToMe parity {label}: max abs {diff:.1e}")
    assert diff <= TOL, diff
    return got


class Ref:
    """A reference call bound to its pipeline (for :func:`compare`)."""

    def __init__(self, ref, *args, **kw):
        self.ref, self.args, self.kw = ref, args, kw

    def __call__(self):
        return self.ref(*self.args, **self.kw).images


def mine_call(pipe, *args, controls=(), **kw):
    return lambda extra: pipe(*args, controls=[*controls, *extra], **kw).images


@pytest.fixture(scope="module")
def sd1(tiny_model):
    path = tiny_model("sd1")
    return reference("StableDiffusionPipeline", path), ours(path)


SD1_CASES = {
    "defaults": (dict(), 7.5),
    "no rand": (dict(ratio=0.3, use_rand=False), 7.5),
    "strides, crossattn, mlp": (dict(ratio=0.6, sx=4, sy=2, merge_crossattn=True, merge_mlp=True), 5.0),
    "mid block too": (dict(ratio=0.5, max_downsample=2), 7.5),
    "3x3 cells cut at the edge, mlp only": (dict(ratio=0.7, sx=3, sy=3, max_downsample=2, merge_attn=False,
                                                  merge_mlp=True), 7.5),
    "no cfg (odd batch: no rand)": (dict(ratio=0.5), 1.0),
}


@pytest.mark.parametrize("case", list(SD1_CASES))
def test_parity_sd1(sd1, case):
    ref, mine = sd1
    tome, scale = SD1_CASES[case]
    kw = dict(KW, guidance_scale=scale)
    compare(Ref(ref, "a cat", generator=gen(2), **kw), mine_call(mine, "a cat", generator=gen(2), **kw), tome, case)


def test_parity_sd1_two_images_per_prompt_euler_a(sd1):
    ref, mine = sd1
    ref.scheduler, saved = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config), ref.scheduler
    try:
        kw = dict(KW, guidance_scale=6.0, num_images_per_prompt=2, negative_prompt="blurry")
        compare(Ref(ref, "a dog", generator=gen(4), **kw),
                mine_call(mine, "a dog", generator=gen(4), scheduler="euler_a", **kw), dict(ratio=0.4), "euler_a x2")
    finally:
        ref.scheduler = saved


def test_parity_sd2_v_prediction(tiny_model):
    path = tiny_model("sd2", prediction_type="v_prediction")
    ref, mine = reference("StableDiffusionPipeline", path), ours(path)
    kw = dict(KW, guidance_scale=7.5)
    compare(Ref(ref, "a cat", generator=gen(1), **kw), mine_call(mine, "a cat", generator=gen(1), **kw),
            dict(ratio=0.5, merge_crossattn=True), "sd2 v")


def test_parity_sdxl(tiny_model):
    """The tiny SDXL UNet has attention at half resolution only: max_downsample=2 reaches it."""
    path = tiny_model("sdxl")
    ref, mine = reference("StableDiffusionXLPipeline", path), ours(path)
    kw = dict(KW, guidance_scale=6.0)
    for tome in (dict(ratio=0.5, max_downsample=2), dict(ratio=0.3, max_downsample=4, use_rand=False, merge_mlp=True)):
        compare(Ref(ref, "a cat", generator=gen(3), **kw), mine_call(mine, "a cat", generator=gen(3), **kw), tome,
                f"sdxl {tome}")


# ---------------------------------------------------------------- seeding and the odd-batch rule

def test_seed_none_forks_the_global_generator_and_seeds_matter(sd1):
    _, mine = sd1
    kw = dict(KW, guidance_scale=7.5)
    seeded = mine("a cat", generator=gen(2), controls=[ToMe(seed=5)], **kw).images
    torch.manual_seed(5)
    forked = mine("a cat", generator=gen(2), controls=[ToMe()], **kw).images
    other = mine("a cat", generator=gen(2), controls=[ToMe(seed=6)], **kw).images
    fixed = mine("a cat", generator=gen(2), controls=[ToMe(use_rand=False)], **kw).images
    assert np.array_equal(seeded, forked)
    assert np.abs(seeded - other).max() > 1e-4 and np.abs(seeded - fixed).max() > 1e-4


def test_odd_batches_take_the_top_left_destination(sd1):
    _, mine = sd1
    kw = dict(KW, guidance_scale=1.0)   # one row per call
    runs = [mine("a cat", generator=gen(2), controls=[t], **kw).images
            for t in (ToMe(seed=5), ToMe(seed=6), ToMe(use_rand=False))]
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[0], runs[2])


def test_merge_is_per_row():
    """Each row is matched on its own tokens: a batch merges as its rows one by one."""
    x = torch.randn(4, 64, 16, generator=gen(0))
    y = torch.randn(4, 64, 8, generator=gen(1))
    merge, unmerge = bipartite_merge(x, 8, 8, 2, 2, 32)
    whole = unmerge(merge(y) * 2)
    for i in range(4):
        m, u = bipartite_merge(x[i:i + 1], 8, 8, 2, 2, 32)
        assert torch.equal(u(m(y[i:i + 1]) * 2), whole[i:i + 1])
    assert merge(y).shape == (4, 32, 8)


# ---------------------------------------------------------------- teardown

def _clean(pipe):
    blocks = [m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)]
    return all(b.token_merge is None for b in blocks) and not pipe.unet._forward_pre_hooks


def test_teardown_restores_the_unet_also_after_a_failure(sd1):
    _, mine = sd1
    kw = dict(KW, guidance_scale=7.5)
    plain = mine("a cat", generator=gen(2), **kw).images
    mine("a cat", generator=gen(2), controls=[ToMe(seed=1)], **kw)
    assert _clean(mine)

    class Boom(cd.Control):
        def after_step(self, ctx, step, latents):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        mine("a cat", generator=gen(2), controls=[ToMe(seed=1), Boom()], **kw)
    assert _clean(mine)
    assert np.array_equal(mine("a cat", generator=gen(2), **kw).images, plain)


# ---------------------------------------------------------------- with other controls

def test_with_controlnet(tiny_model, tmp_path):
    path = tiny_model("sd1")
    cn_path = build_controlnet(path, tmp_path / "cn")
    ref = reference("StableDiffusionControlNetPipeline", path, controlnet=diffusers.ControlNetModel.from_pretrained(cn_path))
    mine = ours(path)
    image = PIL.Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    kw = dict(KW, guidance_scale=7.5)
    cn = cd.ControlNet(cd.load_controlnet(cn_path), image, scale=0.8)
    compare(Ref(ref, "a hill", image=image, controlnet_conditioning_scale=0.8, generator=gen(5), **kw),
            mine_call(mine, "a hill", generator=gen(5), controls=[cn], **kw), dict(ratio=0.5), "controlnet")


@pytest.mark.parametrize("concepts", [1, 2])   # 3 rows (no rand) and 4 rows (rand) per call
def test_with_sega(tiny_model, concepts):
    path = tiny_model("sd1")
    ref, mine = reference("SemanticStableDiffusionPipeline", path), ours(path)
    words = ["smiling", "glasses"][:concepts]
    kw = dict(KW, guidance_scale=6.0)
    sega = SEGA([Concept(w, scale=5.0, warmup=0) for w in words])
    compare(Ref(ref, "a face", generator=gen(3), editing_prompt=words, edit_guidance_scale=5.0, edit_warmup_steps=0,
                **kw),
            mine_call(mine, "a face", generator=gen(3), controls=[sega], **kw), dict(ratio=0.5), f"sega x{concepts}")


@pytest.mark.parametrize("batch_size", [1, 2])
def test_with_multidiffusion(tiny_model, batch_size):
    """Each view's UNet call merges on the view's own grid, as tomesd's size hook sees it."""
    path = tiny_model("sd1")
    ref, mine = reference("StableDiffusionPanoramaPipeline", path), ours(path)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.get_views = functools.partial(type(ref).get_views, ref, window_size=8, stride=4)
    kw = dict(KW, guidance_scale=7.5, width=128)
    compare(Ref(ref, "a wide valley", generator=gen(4), view_batch_size=batch_size, **kw),
            mine_call(mine, "a wide valley", generator=gen(4), scheduler="ddim",
                      controls=[MultiDiffusion(window=64, stride=32, batch_size=batch_size)], **kw),
            dict(ratio=0.5), f"multidiffusion batch {batch_size}")


@pytest.mark.parametrize("scale", [7.5, 1.0])   # 3 rows (no rand), 2 rows (rand)
def test_with_pag_at_merged_layers(tiny_model, scale):
    path = tiny_model("sd1")
    ref = diffusers.StableDiffusionPAGPipeline.from_pretrained(path, enable_pag=True, safety_checker=None,
                                                               requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.set_pag_applied_layers(["down_blocks.0", "up_blocks.1"])
    mine = ours(path)
    kw = dict(KW, guidance_scale=scale)
    pag = PAG(2.0, ("down_blocks.0", "up_blocks.1"))
    compare(Ref(ref, "a cat", generator=gen(2), pag_scale=2.0, **kw),
            mine_call(mine, "a cat", generator=gen(2), controls=[pag], **kw), dict(ratio=0.5), f"pag cfg {scale}")


def test_with_sag_below_the_mid_block_and_refused_there(tiny_model):
    path = tiny_model("sd1")
    ref, mine = reference("StableDiffusionSAGPipeline", path), ours(path)
    kw = dict(KW, guidance_scale=7.5)
    compare(Ref(ref, "a cat", generator=gen(2), sag_scale=0.75, **kw),
            mine_call(mine, "a cat", generator=gen(2), controls=[SAG(0.75)], **kw), dict(ratio=0.5), "sag")
    for order in ([SAG(0.75), ToMe(max_downsample=2)], [ToMe(max_downsample=2), SAG(0.75)]):
        with pytest.raises(ValueError, match="SAG"):
            mine("a cat", controls=order, **kw)
        assert _clean(mine)
    # no merged self-attention at the mid block: allowed
    mine("a cat", controls=[SAG(0.75), ToMe(max_downsample=2, merge_attn=False, merge_mlp=True)], **kw)


def test_with_attend_and_excite_unless_its_maps_are_merged(tiny_model):
    path = tiny_model("sd1")
    ref, mine = reference("StableDiffusionAttendAndExcitePipeline", path), ours(path)
    ae = dict(max_iter_to_alter=2, thresholds={0: 0.05, 1: 0.5, 2: 0.8}, scale_factor=20, attn_res=(8, 8))
    kw = dict(KW, guidance_scale=7.5)
    compare(Ref(ref, "a cat and a dog", token_indices=[2, 9], generator=gen(0), **ae, **kw),
            mine_call(mine, "a cat and a dog", generator=gen(0), controls=[AttendAndExcite([2, 9], **ae)], **kw),
            dict(ratio=0.5), "attend-and-excite")
    with pytest.raises(ValueError, match="Attend-and-Excite"):
        mine("a cat and a dog", controls=[AttendAndExcite([2, 9], **ae), ToMe(merge_crossattn=True)], **kw)
    assert _clean(mine)


def test_with_fabric(tiny_model, monkeypatch):
    """The feedback pass records merged tokens and the main call attends to them, as the
    community pipeline under tomesd."""
    from test_fabric import IMAGES, community, run_reference

    path = tiny_model("sd1")
    sd = reference("StableDiffusionPipeline", path)
    ref = community.FabricPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                   scheduler=sd.scheduler)
    ref.set_progress_bar_config(disable=True)
    mine = ours(path)
    fabric = dict(liked=IMAGES[:1], disliked=IMAGES[1:2])
    common = dict(negative_prompt="blurry", guidance_scale=6.0, num_inference_steps=3)
    with patched(sd, ratio=0.5):
        expected = run_reference(ref, sd.scheduler.config, None, monkeypatch, 3, prompt="a cat", num_images=1,
                                 **common, **fabric)
    kw = dict(common, output_type="np", height=64, width=64)
    got = mine("a cat", generator=gen(3), controls=[FABRIC(**fabric), ToMe(seed=SEED)], **kw).images
    alone = mine("a cat", generator=gen(3), controls=[FABRIC(**fabric)], **kw).images
    assert np.abs(got - alone).max() > 1e-3
    diff = float(np.abs(got - expected).max())
    print(f"ToMe parity fabric: max abs {diff:.1e}")
    assert diff <= TOL


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=1.0), "ratio"), (dict(ratio=-0.1), "ratio"), (dict(ratio="half"), "ratio"),
    (dict(max_downsample=0), "max_downsample"), (dict(max_downsample=1.5), "max_downsample"),
    (dict(sx=0), "sx"), (dict(sy=True), "sy"), (dict(use_rand=1), "use_rand"),
    (dict(merge_attn=None), "merge_attn"), (dict(merge_crossattn="no"), "merge_crossattn"),
    (dict(merge_mlp=0), "merge_mlp"), (dict(seed=1.5), "seed"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToMe(**kwargs)


def test_setup_errors(pipe):
    with pytest.raises(ValueError, match="sx, sy"):
        pipe("a cat", height=64, width=64, controls=[ToMe(sx=16)])
    with pytest.raises(ValueError, match="one ToMe"):
        pipe("a cat", height=64, width=64, controls=[ToMe(), ToMe()])
    assert _clean(pipe)


def test_defaults_and_describe():
    t = ToMe()
    assert (t.ratio, t.max_downsample, t.sx, t.sy, t.use_rand, t.merge_attn, t.merge_crossattn, t.merge_mlp,
            t.seed) == (0.5, 1, 2, 2, True, True, False, False, None)
    assert t.describe()["name"] == "ToMe" and t.describe()["ratio"] == 0.5
