"""The embedded default model's data and recipe: synthetic scenes, the word-level tokenizer,
and a tiny run of the training recipe that yields a folder the pipeline loads."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from controldiff import Pipeline
from controldiff.demo import recipe, scenes
from controldiff.demo.tokenizer import merges_for, write_tokenizer


def test_scenes_are_a_function_of_the_seed():
    a = [scenes.sample(random.Random(7)) for _ in range(3)]
    b = [scenes.sample(random.Random(7)) for _ in range(3)]
    assert a == b
    assert np.array_equal(np.asarray(scenes.render(a[0])), np.asarray(scenes.render(b[0])))
    assert scenes.sample(random.Random(8)) != a[0]


def test_held_out_objects_never_appear_in_training_scenes():
    held = scenes.held_out()
    assert len(held) == 30
    rng = random.Random(0)
    seen = {(t.colour, t.shape, t.position, t.size) for _ in range(3000) for t in scenes.sample(rng).things}
    assert not seen & held
    assert len(seen) > 150  # the rest of the 240 objects are drawn
    evaluation = [scenes.sample(rng, held="only") for _ in range(50)]
    assert all((t.colour, t.shape, t.position, t.size) in held for s in evaluation for t in s.things)


def test_objects_do_not_overlap_and_colours_differ_from_the_background():
    rng = random.Random(1)
    for _ in range(400):
        s = scenes.sample(rng)
        m = scenes.masks(s)
        assert m.sum(axis=0).max() <= 1.0 + 1e-6, s
        assert s.background not in {t.colour for t in s.things}
        img = np.asarray(scenes.render(s)).astype(int)
        corner = img[0, 0]
        assert np.abs(corner - scenes.COLOURS[s.background]).max() <= 1


def test_counts_and_captions():
    rng = random.Random(2)
    s = scenes.sample(rng, count=3)
    assert len(s.things) == 3 and len({t.position for t in s.things}) == 3
    assert s.caption().count(" and ") == 2 and s.caption().endswith(f"on a {s.background} background")
    with pytest.raises(ValueError, match="count"):
        scenes.sample(rng, count=4)
    with pytest.raises(ValueError, match="held"):
        scenes.sample(rng, held="some")


def test_maps_follow_the_objects():
    s = scenes.Scene((scenes.Thing("red", "square", "top left", "large"),), "blue")
    pos = np.asarray(scenes.position_map(s))[..., 0] > 127
    edges = np.asarray(scenes.edge_map(s))[..., 0] > 127
    m = scenes.masks(s)[0] > 0.5
    assert np.array_equal(pos, m)
    assert edges.any() and not (edges & ~m).any()  # outlines lie on the object
    assert edges.sum() < m.sum() / 2                # ...and are outlines, not the fill
    cy, cx = np.argwhere(pos).mean(axis=0)
    assert abs(cx - 16) < 1.5 and abs(cy - 16) < 1.5


def test_new_shapes_render_differently():
    shapes = {}
    for shape in scenes.SHAPES + scenes.NEW_SHAPES:
        s = scenes.Scene((scenes.Thing("white", shape, "center", "large"),), "black")
        shapes[shape] = scenes.masks(s)[0]
    names = list(shapes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(shapes[a] - shapes[b]).sum() > 20, (a, b)


def test_edits_change_one_attribute():
    rng = random.Random(3)
    kinds = set()
    for _ in range(200):
        s = scenes.sample(rng)
        text, t = scenes.edit(rng, s)
        assert t != s and t.caption() != s.caption()
        changed = [(a, b) for a, b in zip(s.things, t.things) if a != b]
        if text.startswith("make the background"):
            kinds.add("background")
            assert not changed and t.background == text.split()[-1]
        else:
            (a, b), = changed
            assert (a.colour != b.colour) + (a.shape != b.shape) == 1 and a.position == b.position
            kinds.add("colour" if a.colour != b.colour else "shape")
            assert a.shape in text
    assert kinds == {"background", "colour", "shape"}


def test_word_tokenizer_gives_one_token_per_word(tmp_path):
    vocab = write_tokenizer(tmp_path, scenes.WORDS)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for w in scenes.WORDS:
        ids = tok(w).input_ids
        assert len(ids) == 3 and tok.convert_ids_to_tokens(ids[1]) == w + "</w>", w
    longest = " and ".join(["a small yellow triangle at the bottom right"] * 3) + " on a purple background"
    assert len(tok(longest).input_ids) <= 77
    assert len(tok("a zebra").input_ids) > 4  # other words still tokenise, by characters
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    assert merges_for(["red", "green"]) == merges_for(["red", "green"])


def test_a_tiny_recipe_run_makes_a_model_the_pipeline_loads(tmp_path):
    torch.manual_seed(0)
    r = recipe.Recipe(vae_steps=12, vae_batch=4, steps=3, batch=4, pool=16, snapshot_every=2, warmup=1,
                      log_every=4)
    out = recipe.train(tmp_path / "model", r)
    info = json.loads((out / "recipe.json").read_text())
    assert info["step"] == 3 and info["recipe"]["steps"] == 3
    vae_losses = [e["loss"] for e in info["log"] if e["stage"] == "vae"]
    assert vae_losses[-1] < vae_losses[0]  # it trains (mean loss of steps 9-12 below 1-4)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # snapshots renamed into place, no temp left
    pipe = Pipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor != 1.0
    img = pipe("a small red circle at the center on a blue background", num_inference_steps=2, seed=1,
               output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_the_folder_names_its_scheduler_for_diffusers(tmp_path):
    """diffusers loads the scheduler class ``model_index.json`` names (not the config's): a
    zero-SNR model's DDIM must be named there, or diffusers samples it with PNDM."""
    from diffusers import StableDiffusionPipeline

    r = recipe.Recipe(vae_steps=2, vae_batch=2, steps=1, batch=2, pool=4, snapshot_every=1, warmup=1, log_every=1,
                      beta_schedule="zero-snr", prediction_type="v_prediction", snr_gamma=0.0)
    out = recipe.train(tmp_path / "model", r)
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    ref = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert type(ref.scheduler).__name__ == "DDIMScheduler" and ref.scheduler.config.rescale_betas_zero_snr
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_learning_rate_and_noise_schedules():
    constant = recipe.Recipe(steps=1000, warmup=100)
    assert [recipe.lr_factor(constant, s) for s in (0, 49, 99, 500, 999)] == [0.01, 0.5, 1.0, 1.0, 1.0]
    cosine = recipe.Recipe(steps=1000, warmup=100, lr_decay="cosine", min_lr_ratio=0.1)
    values = [recipe.lr_factor(cosine, s) for s in range(100, 1001, 100)]
    assert values[0] == 1.0 and values == sorted(values, reverse=True) and values[-1] == pytest.approx(0.1)
    # SD's schedule keeps 7% of the signal at the last step, DDPM's linear one 0.6% (the docstring's reason)
    from controldiff.schedulers import create

    for name, kept in (("scaled_linear", 0.068), ("linear", 0.0064)):
        sched = create("ddpm", recipe.scheduler_config(name))
        assert float(sched.alphas_cumprod[-1]) ** 0.5 == pytest.approx(kept, rel=0.02)
    zero = recipe.scheduler_config("zero-snr", "v_prediction")  # none: the sampler starts from pure noise
    assert float(create("ddpm", zero).alphas_cumprod[-1]) == 0
    ddim = create("ddim", zero)
    ddim.set_timesteps(4)
    assert ddim.timesteps.tolist()[0] == 999  # trailing: the first step is the pure-noise one


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps: expected a positive integer"), (dict(batch=2.5), "batch: expected a positive integer"),
    (dict(lr=0.0), "lr: expected a finite number > 0"), (dict(caption_dropout=1.0), "caption_dropout"),
    (dict(levels=5), "levels: expected 3 or 4"), (dict(vae_from="/no/such"), "vae_from: /no/such has no vae/"),
    (dict(beta_schedule="cosine"), "beta_schedule: expected one of"), (dict(lr_decay="step"), "lr_decay"),
    (dict(target_latents="mode"), "target_latents: expected"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio"), (dict(snr_gamma=-1.0), "snr_gamma: expected a finite number >= 0"),
    (dict(prediction_type="sample"), "prediction_type: expected"),
    (dict(beta_schedule="zero-snr"), "prediction_type: the zero-snr schedule needs 'v_prediction'"),
])
def test_recipe_settings_are_checked_before_any_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        recipe.Recipe(**kwargs)


def test_recipe_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        recipe.main([str(tmp_path / "out"), "--steps", "0"])
    assert e.value.code == 2 and "steps: expected a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.main([str(tmp_path), "--ship"])  # not a trained folder: nothing is copied into the package
    assert "is not a trained model folder" in capsys.readouterr().err
