"""Aspect-ratio buckets (kohya's sizes and nearest-ratio choice, cover resize + center crop,
one size per batch, exact resume) and the text encoders' own AdamW lr / weight decay."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_training_parity import photo, script_sdxl  # noqa: F401  (a fixture)

from controldiff.training import LoRA, TrainConfig, train
from controldiff.training.batches import Batches
from controldiff.training.buckets import bucket_sizes, nearest_bucket
from controldiff.training.data import read_folder
from controldiff.training.trainer import _Data, bucket_ids
from controldiff.training.transforms import BucketTransform, load_rgb

# (width, height): square-ish, tall 1:3, wide 3:1, tall 1:4, and a second square for a shared bucket
SIZES = ((40, 32), (32, 96), (96, 32), (32, 128), (36, 34))


def photos(folder, sizes=SIZES):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def config(data, out, **kw):
    base = dict(prompt="a photo of sks", resolution=32, steps=4, batch_size=2, seed=1, lr=1e-2, progress=False,
                buckets=True, bucket_step=16)
    return TrainConfig(data, out, **{**base, **kw})


def kohya_buckets(max_area, min_size, max_size, divisible):
    """kohya sd-scripts' ``make_bucket_resolutions`` (library/model_util.py), as written there."""
    resos = {(int(max_area ** 0.5 // divisible) * divisible,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def test_bucket_sizes_are_kohyas():
    assert bucket_sizes(512) == kohya_buckets(512 * 512, 256, 1024, 64)
    assert bucket_sizes(1024) == kohya_buckets(1024 * 1024, 512, 2048, 64)
    assert bucket_sizes(32, 16) == [(16, 48), (16, 64), (32, 32), (48, 16), (64, 16)]
    assert (832, 1216) in bucket_sizes(1024)  # the usual SDXL portrait bucket


def test_images_go_to_the_bucket_of_nearest_ratio_resized_to_cover(tmp_path):
    examples = read_folder(photos(tmp_path / "d"), 32, "x")
    sizes = bucket_sizes(32, 16)
    chosen = [sizes[b] for b in bucket_ids(examples, config(tmp_path, tmp_path))]
    assert chosen == [(32, 32), (16, 48), (48, 16), (16, 64), (32, 32)]
    assert [sizes[nearest_bucket(s, sizes)] for s in ((1024, 512), (512, 1536))] == [(32, 32), (16, 48)]
    t = BucketTransform(32)
    for e, size in zip(examples, chosen):
        img = load_rgb(e.path)
        x, (top, left) = t(img, size)
        assert x.shape == (3, size[1], size[0])
        w, h = t.resized_to(*e.size, size)  # covers the bucket, one side equal, the ratio kept
        assert (w >= size[0] and h >= size[1]) and (w == size[0] or h == size[1])
        assert abs(w / h - e.size[0] / e.size[1]) < 0.05
        ref = img.resize((w, h), Image.LANCZOS).crop((left, top, left + size[0], top + size[1]))
        assert (top, left) == ((h - size[1]) // 2, (w - size[0]) // 2)
        assert torch.equal(x, torch.from_numpy(np.array(ref)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5))


def test_batches_come_from_one_bucket_shuffled_and_seeded():
    groups = [0, 1, 0, 2, 0, 1, 0, 0]
    torch.manual_seed(3)
    b = Batches(len(groups), 2, groups=groups)
    epochs = [[b.next() for _ in range(6)] for _ in range(3)]  # 0: 5 -> 3 batches, 1: 2 -> 1, 2: 1 -> 1... = 5
    seen = [bt for e in epochs for bt in e]
    assert all(len({groups[i] for i in bt}) == 1 for bt in seen)
    b = Batches(len(groups), 2, groups=groups)
    torch.manual_seed(3)
    first = [b.next() for _ in range(5)]
    assert sorted(i for bt in first for i in bt) == list(range(8))  # an epoch: every example once
    assert b.position == len(b.order) == 5
    torch.manual_seed(3)
    again = Batches(len(groups), 2, groups=groups)
    assert [again.next() for _ in range(5)] == first  # seeded
    orders = {tuple(map(tuple, Batches(8, 2, groups=groups)._shuffle())) for _ in range(20)}
    assert len(orders) > 1  # shuffled
    s = b.state()
    resumed = Batches(8, 2, s["epoch"], s["order"], s["position"], groups)
    assert resumed.state() == s and s["groups"] == groups


def test_every_batch_has_one_size_and_sdxl_time_ids_name_the_bucket(tmp_path, tiny_model):
    data = photos(tmp_path / "d")
    cfg = config(data, tmp_path / "o", flip=True)
    examples = read_folder(data, 32, "x")
    d = _Data(examples, cfg, vae=None, sdxl=True)
    torch.manual_seed(0)
    b = Batches(len(examples), 2, groups=bucket_ids(examples, cfg))
    for _ in range(8):
        indices, images, time_ids = d.draw(b.next())
        assert len({x.shape for x in images}) == 1
        h, w = images[0].shape[1:]
        for i, t in zip(indices, time_ids):
            assert t[0:2] == [examples[i].size[1], examples[i].size[0]] and t[4:] == [h, w]


def test_a_run_with_buckets_trains_and_resumes_exactly(tiny_model, tmp_path):
    data = photos(tmp_path / "d")
    model = tiny_model("sd1")
    straight = train(model, LoRA(), config(data, tmp_path / "a", checkpoint_every=2, flip=True))
    resumed = train(model, LoRA(), config(data, tmp_path / "b", resume=tmp_path / "a" / "checkpoint-2", flip=True))
    assert len(straight.losses) == 4 and resumed.losses == straight.losses[2:]
    x = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    y = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert max((x[k] - y[k]).abs().max().item() for k in x) == 0
    with pytest.raises(ValueError, match="resume: .* with buckets"):
        train(model, LoRA(), config(data, tmp_path / "c", resume=tmp_path / "a" / "checkpoint-2", buckets=False))


def test_cached_latents_in_buckets_train_as_uncached(tiny_model, tmp_path, monkeypatch):
    """Each image's latent is cached at its bucket's size; the run equals the uncached one (within
    the rounding of one image's VAE pass against a batch's, as without buckets), and the cached
    run reads each image once."""
    data = photos(tmp_path / "d")
    model = tiny_model("sd1")
    plain = train(model, LoRA(), config(data, tmp_path / "a", steps=5))
    loads = []
    from controldiff.training import trainer
    real = trainer.load_rgb
    monkeypatch.setattr(trainer, "load_rgb", lambda path: loads.append(path) or real(path))
    cached = train(model, LoRA(), config(data, tmp_path / "b", steps=5, cache_latents=True))
    assert len(loads) == len(SIZES)  # once each, at the start
    np.testing.assert_allclose(cached.losses, plain.losses, rtol=0, atol=1e-6)
    x = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    y = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert max((x[k] - y[k]).abs().max().item() for k in x) <= 1e-5


def test_textual_inversion_in_buckets(tiny_model, tmp_path, monkeypatch):
    """Textual inversion trains in buckets (kohya's transform instead of the script's square one)
    and resumes exactly."""
    from controldiff.training import TextualInversion, trainer
    data = photos(tmp_path / "d")
    model = tiny_model("sd1")
    shapes = []
    real = trainer._Data.encode
    monkeypatch.setattr(trainer._Data, "encode", lambda self, drawn: shapes.append(
        {tuple(x.shape) for x in drawn[1]}) or real(self, drawn))
    ti = lambda: TextualInversion("<sks>", "a", repeats=1)  # noqa: E731
    straight = train(model, ti(), config(data, tmp_path / "a", checkpoint_every=2, prompt=None, lr=5e-2))
    assert all(len(s) == 1 for s in shapes) and {(3, 48, 16), (3, 16, 48)} <= set.union(*shapes)  # not squares
    resumed = train(model, ti(), config(data, tmp_path / "b", resume=tmp_path / "a" / "checkpoint-2", prompt=None,
                                        lr=5e-2))
    assert resumed.losses == straight.losses[2:]
    x = load_file(str(tmp_path / "a" / "learned_embeds.safetensors"))
    y = load_file(str(tmp_path / "b" / "learned_embeds.safetensors"))
    assert torch.equal(x["<sks>"], y["<sks>"])


def test_text_encoder_groups_get_their_lr_and_weight_decay(tiny_model, tmp_path, monkeypatch):
    data = photos(tmp_path / "d", SIZES[:2])
    model = tiny_model("sd1")
    made = []
    real = torch.optim.AdamW

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    kw = dict(buckets=False, center_crop=True, steps=2, adam_weight_decay=0.5)
    plain = train(model, LoRA(train_text_encoder=True), config(data, tmp_path / "a", **kw))
    assert len(made[-1].param_groups) == 1
    split = train(model, LoRA(train_text_encoder=True),
                  config(data, tmp_path / "b", text_encoder_lr=1e-1, adam_weight_decay_text_encoder=1e-3, **kw))
    unet_group, te_group = made[-1].param_groups
    assert (unet_group["lr"], unet_group["weight_decay"]) == (1e-2, 0.5)
    assert (te_group["lr"], te_group["weight_decay"]) == (1e-1, 1e-3)
    assert plain.losses[0] == split.losses[0] and plain.losses[1] != split.losses[1]
    same = train(model, LoRA(train_text_encoder=True),
                 config(data, tmp_path / "c", text_encoder_lr=1e-2, adam_weight_decay_text_encoder=0.5, **kw))
    assert len(made[-1].param_groups) == 2 and same.losses == plain.losses  # groups with equal values: the same run
    with pytest.raises(ValueError, match="text_encoder_lr.*trains no text encoder"):
        train(model, LoRA(), config(data, tmp_path / "d2", text_encoder_lr=1e-1, **kw))


def test_argument_errors(tmp_path):
    data = photos(tmp_path / "d", SIZES[:1])
    for kw, match in ((dict(bucket_step=12), "bucket_step: expected a multiple of 8"),
                      (dict(resolution=40), "resolution: with buckets expected a multiple of bucket_step 16"),
                      (dict(cache_latents=True, flip=True), "cache_latents: needs deterministic images"),
                      (dict(class_data=tmp_path / "c", class_prompt="x"), "class_data: prior preservation is not "
                       "supported with buckets"),
                      (dict(text_encoder_lr=0.0), "text_encoder_lr: expected a finite number > 0"),
                      (dict(adam_weight_decay_text_encoder=-1.0), "adam_weight_decay_text_encoder: expected")):
        with pytest.raises(ValueError, match=match):
            config(data, tmp_path / "o", **kw).check()


def test_cli_passes_the_options(tiny_model, tmp_path, monkeypatch):
    from controldiff import cli
    from controldiff.training import trainer

    seen = []
    monkeypatch.setattr(trainer, "train", lambda model, method, config, **k: seen.append(config) or trainer.TrainResult())
    data = photos(tmp_path / "d", SIZES[:1])
    assert cli.main(["train", "lora", str(tiny_model("sd1")), "--data", str(data), "--output", str(tmp_path / "o"),
                     "--prompt", "x", "--resolution", "32", "--buckets", "--bucket-step", "16", "--train-text-encoder",
                     "--text-encoder-lr", "5e-6", "--adam-weight-decay-text-encoder", "1e-3", "--no-progress"]) == 0
    c = seen[0]
    assert (c.buckets, c.bucket_step, c.text_encoder_lr, c.adam_weight_decay_text_encoder) == (True, 16, 5e-6, 1e-3)


def test_sdxl_text_encoder_lr_and_decay_equal_diffusers_script(script_sdxl, tiny_model, tmp_path, monkeypatch):
    """2 steps of UNet + both text encoders' LoRAs with the text encoders' own lr and weight
    decay equal ``train_dreambooth_lora_sdxl.py`` given the same values."""
    model = tiny_model("sdxl")
    data = tmp_path / "data"
    data.mkdir()
    photo(data / "a.png", 40, 32, 0)
    args = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", "a photo of sks", "--output_dir", str(tmp_path / "ref"), "--resolution", "24",
            "--train_batch_size", "1", "--max_train_steps", "2", "--learning_rate", "1e-3", "--seed", "3",
            "--rank", "4", "--report_to", "all", "--checkpointing_steps", "1000", "--center_crop",
            "--adam_weight_decay", "1e-2", "--text_encoder_lr", "3e-2", "--adam_weight_decay_text_encoder", "0.5",
            "--train_text_encoder"]
    parsed = script_sdxl.parse_args(args)
    monkeypatch.setattr(script_sdxl, "args", parsed, raising=False)
    script_sdxl.main(parsed)
    theirs = load_file(str(tmp_path / "ref" / "pytorch_lora_weights.safetensors"))
    runs = {}
    for name, kw in (("split", dict(text_encoder_lr=3e-2, adam_weight_decay_text_encoder=0.5)), ("one", {})):
        train(model, LoRA(rank=4, train_text_encoder=True),
              TrainConfig(data, tmp_path / name, prompt="a photo of sks", format="diffusers", progress=False, seed=3,
                          steps=2, lr=1e-3, resolution=24, center_crop=True, adam_weight_decay=1e-2, **kw))
        runs[name] = load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors"))
    assert set(runs["split"]) == set(theirs)
    worst = max((runs["split"][k] - theirs[k]).abs().max().item() for k in theirs)
    text = [k for k in theirs if k.startswith("text_encoder") and ".up." in k]
    apart = max((runs["one"][k] - theirs[k]).abs().max().item() for k in text)
    assert worst <= 1e-5, worst
    assert apart > 1e-4  # the text encoders' own lr changed them
