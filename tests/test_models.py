"""Our UNet / VAE / attention against diffusers (the oracle) on tiny random-weight models."""
from __future__ import annotations

import functools

import pytest
import torch

from controldiff import tiny
from controldiff.models import Attention, AttentionSite, AutoencoderKL, UNet2DConditionModel

import diffusers  # the oracle: part of the test extra

TOL = 1e-5


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@functools.lru_cache(maxsize=None)
def unet_pair(family: str, in_channels: int = 4):
    cfg = tiny.unet_config(family, in_channels=in_channels)
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**cfg).eval()
    ours = UNet2DConditionModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@functools.lru_cache(maxsize=None)
def vae_pair(latent_factor: int):
    cfg = tiny.vae_config(latent_factor)
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**cfg).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def unet_inputs(family: str, in_channels: int = 4, batch: int = 2, size=(8, 8), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = tiny.unet_config(family)
    sample = torch.randn(batch, in_channels, *size, generator=g)
    context = torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return sample, context, kwargs


def run_both(family, timestep=10, in_channels=4, batch=2, size=(8, 8), **extra):
    ref, ours = unet_pair(family, in_channels)
    sample, context, kwargs = unet_inputs(family, in_channels, batch, size)
    kwargs.update(extra)
    with torch.no_grad():
        expected = ref(sample, timestep, context, **{k: _copy(v) for k, v in kwargs.items()}).sample
        got = ours(sample, timestep, context, **kwargs)
    return expected, got


def _copy(v):
    # diffusers pops from (and adds in place to) the residual lists it is given
    return [t.clone() for t in v] if isinstance(v, list) else v


# ---------------------------------------------------------------- UNet parity


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_unet_state_dict_keys_equal(family):
    ref, ours = unet_pair(family)
    assert set(ours.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_unet_matches_diffusers(family):
    expected, got = run_both(family)
    assert isinstance(got, torch.Tensor)
    assert got.shape == expected.shape
    assert _max_diff(expected, got) <= TOL


@pytest.mark.parametrize("in_channels", [5, 8, 9])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_in_channels(family, in_channels):
    expected, got = run_both(family, in_channels=in_channels)
    assert _max_diff(expected, got) <= TOL


@pytest.mark.parametrize(
    "timestep",
    [7, 7.5, torch.tensor(999), torch.tensor(3.25), torch.tensor([1, 500, 999]), torch.tensor([250.5, 0.0, 1.0])],
    ids=["int", "float", "0d-int", "0d-float", "batch-int", "batch-float"],
)
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_timestep_forms(family, timestep):
    expected, got = run_both(family, timestep=timestep, batch=3)
    assert _max_diff(expected, got) <= TOL


def test_unet_odd_latent_size_forwards_upsample_size():
    expected, got = run_both("sd1", size=(7, 9))
    assert got.shape == (2, 4, 7, 9)
    assert _max_diff(expected, got) <= TOL


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_controlnet_residuals(family):
    g = torch.Generator().manual_seed(5)
    down = [torch.randn(s, generator=g) for s in _skip_shapes(family)]
    mid = torch.randn(_mid_shape(family), generator=g)
    expected, got = run_both(family, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    _, plain = run_both(family)
    assert _max_diff(expected, got) <= TOL
    assert _max_diff(plain, got) > 1e-3  # the residuals do something


def _skip_shapes(family):
    # tiny configs: 2 blocks of 2 layers, channels (16, 32), 8x8 latents
    return [(2, 16, 8, 8)] * 3 + [(2, 16, 4, 4)] + [(2, 32, 4, 4)] * 2


def _mid_shape(family):
    return (2, 32, 4, 4)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_intrablock_residuals(family):
    g = torch.Generator().manual_seed(6)
    if family == "sd1":  # CrossAttn block (added before its downsampler), then a plain final block
        shapes = [(2, 16, 8, 8), (2, 32, 4, 4)]
    else:  # plain block (added after its downsampler), cross-attn block, then the mid block (T2I-Adapter-XL)
        shapes = [(2, 16, 4, 4), (2, 32, 4, 4), (2, 32, 4, 4)]
    residuals = [torch.randn(s, generator=g) for s in shapes]
    kept = [r.clone() for r in residuals]
    expected, got = run_both(family, down_intrablock_additional_residuals=residuals)
    _, plain = run_both(family)
    assert _max_diff(expected, got) <= TOL
    assert _max_diff(plain, got) > 1e-3
    assert len(residuals) == len(shapes) and all(torch.equal(a, b) for a, b in zip(residuals, kept))


def test_unet_legacy_adapter_residuals_via_down_block_argument():
    g = torch.Generator().manual_seed(7)
    residuals = [torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 32, 4, 4, generator=g)]
    expected, got = run_both("sd1", down_block_additional_residuals=residuals)
    assert _max_diff(expected, got) <= TOL


def test_unet_controlnet_and_adapter_together():
    g = torch.Generator().manual_seed(8)
    down = [torch.randn(s, generator=g) for s in _skip_shapes("sd1")]
    mid = torch.randn(_mid_shape("sd1"), generator=g)
    intra = [torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 32, 4, 4, generator=g)]
    expected, got = run_both(
        "sd1", down_block_additional_residuals=down, mid_block_additional_residual=mid,
        down_intrablock_additional_residuals=intra,
    )
    assert _max_diff(expected, got) <= TOL


# ---------------------------------------------------------------- config, meta device


def test_unet_config_filled_and_unknown_keys_ignored():
    cfg = dict(tiny.unet_config("sd2"), _class_name="UNet2DConditionModel", some_future_key=3)
    unet = UNet2DConditionModel(cfg)
    assert unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert unet.config.flip_sin_to_cos is True and unet.config.freq_shift == 0
    assert unet.config.upcast_attention is True
    assert unet.config["_class_name"] == "UNet2DConditionModel"
    assert "some_future_key" not in unet.config
    assert unet.dtype == torch.float32 and unet.device.type == "cpu"


@pytest.mark.parametrize(
    "key,value",
    [("class_embed_type", "timestep"), ("time_cond_proj_dim", 256), ("dual_cross_attention", True),
     ("encoder_hid_dim_type", "text_proj"), ("addition_embed_type", "text"), ("only_cross_attention", True),
     ("resnet_time_scale_shift", "scale_shift"), ("num_attention_heads", 4)],
)
def test_unet_unsupported_option_raises(key, value):
    with pytest.raises(ValueError, match=key):
        UNet2DConditionModel(dict(tiny.unet_config("sd1"), **{key: value}))


def test_unet_unsupported_block_type_raises():
    cfg = dict(tiny.unet_config("sd1"), down_block_types=["AttnDownBlock2D", "DownBlock2D"])
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        UNet2DConditionModel(cfg)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_meta_construction_and_assign_load(family):
    ref, ours = unet_pair(family)
    with torch.device("meta"):
        meta = UNet2DConditionModel(tiny.unet_config(family))
    assert meta.device.type == "meta"
    assert not list(meta.buffers())
    meta.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, strict=True, assign=True)
    meta.eval()
    sample, context, kwargs = unet_inputs(family)
    with torch.no_grad():
        assert torch.equal(meta(sample, 10, context, **kwargs), ours(sample, 10, context, **kwargs))

    with torch.device("meta"):
        vae = AutoencoderKL(tiny.vae_config(8))
    assert not list(vae.buffers())
    vae.load_state_dict(vae_pair(8)[0].state_dict(), strict=True, assign=True)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(vae.decode(z), vae_pair(8)[1].decode(z))


# ---------------------------------------------------------------- VAE


@pytest.mark.parametrize("latent_factor", [8, 2])
def test_vae_matches_diffusers(latent_factor):
    ref, ours = vae_pair(latent_factor)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.latent_factor == latent_factor
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        dist_ref = ref.encode(x).latent_dist
        dist = ours.encode(x)
        assert dist.mean.shape == (2, 4, 32 // latent_factor, 32 // latent_factor)
        assert _max_diff(dist_ref.mean, dist.mean) <= TOL
        assert _max_diff(dist_ref.std, dist.std) <= TOL
        assert _max_diff(dist_ref.logvar, dist.logvar) <= TOL
        assert torch.equal(dist.mode(), dist.mean)
        s_ref = dist_ref.sample(torch.Generator().manual_seed(3))
        s = dist.sample(torch.Generator().manual_seed(3))
        assert _max_diff(s_ref, s) <= TOL
        assert not torch.equal(s, dist.mean)
        assert _max_diff(ref.decode(s_ref).sample, ours.decode(s)) <= TOL
        assert _max_diff(ours.decode(s, sliced=True), ours.decode(s)) <= TOL
        assert _max_diff(ours.encode(x, sliced=True).mean, dist.mean) <= TOL


def test_vae_config_options_kept():
    cfg = dict(tiny.vae_config(8), shift_factor=0.1, force_upcast=False, scaling_factor=0.13025)
    vae = AutoencoderKL(cfg)
    assert vae.config.shift_factor == 0.1 and vae.config.force_upcast is False
    assert vae.config.scaling_factor == 0.13025 and vae.config.use_quant_conv is True
    no_quant = AutoencoderKL(dict(tiny.vae_config(8), use_quant_conv=False, use_post_quant_conv=False,
                                  mid_block_add_attention=False))
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**no_quant.config).eval()
    assert set(no_quant.state_dict()) == set(ref.state_dict())
    no_quant.load_state_dict(ref.state_dict())
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert _max_diff(ref.decode(z).sample, no_quant.decode(z)) <= TOL


# ---------------------------------------------------------------- attention sites and processors

SITE = "mid_block.attentions.0.transformer_blocks.0.attn1"


def test_attention_sites():
    ref, ours = unet_pair("sdxl")
    sites = ours.attention_sites()
    expected = {k[: -len(".processor")] for k in ref.attn_processors}
    assert set(sites) == expected
    assert all(isinstance(m, Attention) and m.site.name == n for n, m in sites.items())
    site = sites["up_blocks.0.attentions.2.transformer_blocks.1.attn2"].site
    assert site == AttentionSite("up_blocks.0.attentions.2.transformer_blocks.1.attn2", "up", 0, 2, 1, "cross")
    mid = sites[SITE].site
    assert (mid.block, mid.block_index, mid.attention_index, mid.transformer_index, mid.kind) == ("mid", 0, 0, 0, "self")
    assert {s.site.block for s in sites.values()} == {"down", "mid", "up"}


def test_processor_active_only_inside_with():
    _, unet = unet_pair("sd1")
    sample, context, _ = unet_inputs("sd1")
    calls = []

    def zero(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        calls.append(attn.site.name)
        return torch.zeros_like(hidden_states)

    with torch.no_grad():
        plain = unet(sample, 10, context)
        with unet.attention_processors({SITE: zero}):
            changed = unet(sample, 10, context)
        assert calls == [SITE]
        after = unet(sample, 10, context)
    assert calls == [SITE]
    assert _max_diff(plain, changed) > 1e-4
    assert torch.equal(plain, after)
    assert all(m.processor is None for m in unet.attention_sites().values())


def test_default_processor_and_probs_helpers_give_same_output():
    for family in ("sd1", "sd2"):
        _, unet = unet_pair(family)
        sample, context, _ = unet_inputs(family)

        def default(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            return attn.default(hidden_states, encoder_hidden_states, attention_mask)

        maps = {}

        def explicit(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            q, k, v = attn.project_qkv(hidden_states, encoder_hidden_states)
            probs = attn.probs(q, k, attention_mask)
            maps[attn.site.name] = probs
            return attn.project_out(probs @ v)

        sites = unet.attention_sites()
        with torch.no_grad():
            plain = unet(sample, 10, context)
            with unet.attention_processors({name: default for name in sites}):
                same = unet(sample, 10, context)
            with unet.attention_processors({name: explicit for name in sites}):
                close = unet(sample, 10, context)
        assert torch.equal(plain, same)
        assert _max_diff(plain, close) <= TOL
        assert set(maps) == set(sites)
        cross = next(p for n, p in maps.items() if n.endswith("attn2"))
        assert cross.shape[-1] == 7 and torch.allclose(cross.sum(-1), torch.ones(()))


def test_processors_nest_and_restore_on_exception():
    _, unet = unet_pair("sd1")
    sites = unet.attention_sites()
    a = lambda attn, h, encoder_hidden_states=None, attention_mask=None: h  # noqa: E731
    b = lambda attn, h, encoder_hidden_states=None, attention_mask=None: h * 2  # noqa: E731
    with unet.attention_processors({SITE: a}):
        with unet.attention_processors({SITE: b}):
            assert sites[SITE].processor is b
        assert sites[SITE].processor is a
    assert sites[SITE].processor is None
    with pytest.raises(RuntimeError):
        with unet.attention_processors({SITE: a}):
            raise RuntimeError("boom")
    assert sites[SITE].processor is None


def test_unknown_site_raises():
    _, unet = unet_pair("sd1")
    with pytest.raises(ValueError, match="down_blocks.9.attentions.0"):
        with unet.attention_processors({"down_blocks.9.attentions.0.transformer_blocks.0.attn1": lambda *a, **k: a[1]}):
            pass
    assert all(m.processor is None for m in unet.attention_sites().values())


def test_pag_style_identity_processor():
    """A processor that replaces self-attention by identity for half of the batch only."""
    _, unet = unet_pair("sd1")
    sample, context, _ = unet_inputs("sd1", batch=1)
    sample2, context2 = sample.repeat(2, 1, 1, 1), context.repeat(2, 1, 1)

    def pag(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        n = hidden_states.shape[0] // 2
        normal = attn.default(hidden_states[:n])
        _, _, v = attn.project_qkv(hidden_states[n:])
        return torch.cat([normal, attn.project_out(v)])

    with torch.no_grad():
        plain = unet(sample, 10, context)
        with unet.attention_processors({SITE: pag}):
            out = unet(sample2, 10, context2)
    assert _max_diff(out[:1], plain) <= TOL
    assert _max_diff(out[1:], plain) > 1e-4
