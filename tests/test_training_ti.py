"""Textual inversion training on tiny models: behaviour (the loss on the training images
falls), the saved files (diffusers ``learned_embeds.safetensors``, A1111 ``.pt`` and
``.safetensors``, SDXL ``clip_l``/``clip_g``) load alike in our Pipeline and in diffusers,
exact resume, the CLI, and the errors (multi-token initializer, a token the tokenizer
knows, captions without the token, resume from another model or method)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pipes
from controldiff import cli
from controldiff.training import LoRA, TrainConfig, train
from controldiff.training.textual_inversion import TextualInversion
from test_training import eval_loss, photos

KW = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np")
TOKEN = "<tok>"
PROMPT = f"a photo of a {TOKEN}"


def config(data, out, **kw):
    base = dict(resolution=32, steps=4, batch_size=2, seed=1, lr=5e-2, flip=True, progress=False)
    return TrainConfig(data, out, **{**base, **kw})


def method(**kw):
    return TextualInversion(TOKEN, "a", **{"num_vectors": 2, "repeats": 1, **kw})


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(tiny_model, data, tmp_path_factory):
    """2 vectors trained 30 steps on the tiny SD1 model with the script's templates."""
    out = tmp_path_factory.mktemp("trained")
    return out, train(tiny_model("sd1"), method(), config(data, out, steps=30, center_crop=True))


def initial(model, n=2):
    """The rows training starts from: the initializer's ("a"), ``n`` times."""
    pipe = pipes.ours(model)
    row = pipe.text_encoders[0].get_input_embeddings().weight[pipe.tokenizers[0].encode("a", add_special_tokens=False)]
    return row.detach().repeat(n, 1)


def test_training_lowers_the_loss(trained, data, tiny_model):
    """The text moves a tiny random UNet's loss little, so the trained rows are compared with
    the initializer's and with random rows of its scale: they beat all of them by more than
    the random ones' spread."""
    out, result = trained
    assert len(result.losses) == 30
    model = tiny_model("sd1")
    start = initial(model)
    randoms = [torch.randn(start.shape, generator=gen(s)) * start.std() + start.mean() for s in range(4)]

    def loss(rows):
        pipe = pipes.ours(model)
        pipe.load_textual_inversion(rows, token=TOKEN)
        return eval_loss(pipe, data, prompt=f"a photo of a {TOKEN} {TOKEN}_1")

    after = loss(load_file(str(out / "learned_embeds.safetensors"))[TOKEN])
    others = [loss(start)] + [loss(r) for r in randoms]
    assert after < min(others) - (max(others[1:]) - min(others[1:])), (after, others)


@pytest.mark.parametrize("name", ["learned_embeds.safetensors", "tok.pt", "tok.safetensors"])
def test_saved_embeddings_load_alike_in_our_pipeline_and_diffusers(trained, tiny_model, name):
    out, _ = trained
    assert sorted(p.name for p in out.iterdir()) == ["learned_embeds.safetensors", "tok.pt", "tok.safetensors"]
    model = tiny_model("sd1")
    ours = pipes.ours(model)
    assert ours.load_textual_inversion(out / name, token=TOKEN) == [TOKEN, f"{TOKEN}_1"]
    ref = pipes.reference("StableDiffusionPipeline", model)
    ref.load_textual_inversion(str(out / name), token=TOKEN)
    trained_rows = load_file(str(out / "learned_embeds.safetensors"))[TOKEN]
    ids = ref.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert torch.equal(ref.text_encoder.get_input_embeddings().weight[ids].detach(), trained_rows)
    a = ours(PROMPT, generator=gen(), **KW).images
    b = ref(PROMPT, generator=gen(), **KW).images
    assert np.abs(a - b).max() <= 1e-4
    start = pipes.ours(model)
    start.load_textual_inversion(initial(model), token=TOKEN)
    assert np.abs(a - start(PROMPT, generator=gen(), **KW).images).max() > 1e-3  # trained, not the initializer


def test_sdxl_embeddings_load_alike_in_our_pipeline_and_diffusers(tiny_model, data, tmp_path):
    model = tiny_model("sdxl")
    train(model, method(), config(data, tmp_path, steps=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learned_embeds.safetensors",
                                                          "learned_embeds_2.safetensors", "tok.safetensors"]
    both = load_file(str(tmp_path / "tok.safetensors"))
    first, second = (load_file(str(tmp_path / n))[TOKEN] for n in ("learned_embeds.safetensors",
                                                                   "learned_embeds_2.safetensors"))
    assert torch.equal(both["clip_l"], first) and torch.equal(both["clip_g"], second)
    assert first.shape[0] == second.shape[0] == 2
    ours = pipes.ours(model)
    ours.load_textual_inversion(tmp_path / "tok.safetensors", token=TOKEN)
    ref = pipes.reference("StableDiffusionXLPipeline", model)
    ref.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"), token=TOKEN,
                               text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(str(tmp_path / "learned_embeds_2.safetensors"), token=TOKEN,
                               text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    a = ours(PROMPT, generator=gen(), **KW).images
    b = ref(PROMPT, generator=gen(), **KW).images
    assert np.abs(a - b).max() <= 1e-4


def test_resume_is_exact(tiny_model, data, tmp_path):
    """Templates and flips, min-SNR, 3 batches an epoch: resumed mid-epoch (a batch drawn
    ahead) from a checkpoint equals one run."""
    model = tiny_model("sd1")
    kw = dict(snr_gamma=5.0, steps=4, batch_size=2)
    straight = train(model, method(repeats=2), config(data, tmp_path / "a", checkpoint_every=2, **kw))
    resumed = train(model, method(repeats=2), config(data, tmp_path / "b", resume=tmp_path / "a" / "checkpoint-2",
                                                     **kw))
    assert resumed.losses == straight.losses[2:]
    a, b = (load_file(str(tmp_path / d / "learned_embeds.safetensors"))[TOKEN] for d in "ab")
    assert torch.equal(a, b)


def test_caption_files_hold_the_token(tiny_model, data, tmp_path):
    import shutil

    captioned = tmp_path / "captioned"
    shutil.copytree(data, captioned)
    for i, p in enumerate(sorted(captioned.glob("*.png"))):
        p.with_suffix(".txt").write_text(f"{TOKEN} number {i}")
    seen = []
    m = method()
    real = m.caption
    m.caption = lambda e: seen.append(real(e)) or seen[-1]
    train(tiny_model("sd1"), m, config(captioned, tmp_path / "c", steps=1))
    assert seen and set(seen) <= {f"{TOKEN} {TOKEN}_1 number {i}" for i in range(3)}


def test_errors_before_work(tiny_model, data, tmp_path):
    model = tiny_model("sd1")

    def fails(match, m=None, **kw):
        with pytest.raises(ValueError, match=match):
            train(model, m or method(), config(data, tmp_path / "out", **kw))
        assert not (tmp_path / "out").exists()

    fails(r"initializer_token: 'cat' is 3 tokens for the tokenizer \(\['c', 'a', 't</w>'\]\); pass a word that is one",
          TextualInversion(TOKEN, "cat"))
    fails(r"token: 'a' is already in the tokenizer's vocabulary", TextualInversion("a", "x"))
    fails(r"prompt: 'a photo' does not contain the token '<tok>'", prompt="a photo")
    txt = tmp_path / "txt"
    photos(txt, sizes=((40, 40),))
    (txt / "0.txt").write_text("no token here")
    with pytest.raises(ValueError, match=r"0\.txt: the caption 'no token here' does not contain the token"):
        train(model, method(), config(txt, tmp_path / "out"))
    for kw, match in [(dict(token="two words"), "token: expected"), (dict(initializer_token=""),
                                                                    "initializer_token: expected"),
                      (dict(num_vectors=0), "num_vectors: expected a positive integer"),
                      (dict(learnable_property="face"), "learnable_property: expected one of")]:
        with pytest.raises(ValueError, match=match):
            TextualInversion(**{"token": TOKEN, "initializer_token": "a", **kw})


def test_resume_from_another_model_or_method_is_refused(tiny_model, data, tmp_path):
    train(tiny_model("sd1"), LoRA(), config(data, tmp_path / "lora", steps=1, checkpoint_every=1, prompt=PROMPT))
    train(tiny_model("sd1"), method(), config(data, tmp_path / "ti", steps=1, checkpoint_every=1))
    with pytest.raises(ValueError, match="resume: .* other settings .*'method': 'lora'"):
        train(tiny_model("sd1"), method(), config(data, tmp_path / "b", resume=tmp_path / "lora"))
    with pytest.raises(ValueError, match="resume: .* other settings .*'num_vectors': 2"):
        train(tiny_model("sd1"), method(num_vectors=3), config(data, tmp_path / "b", resume=tmp_path / "ti"))
    with pytest.raises(ValueError, match="resume: .* another model"):
        train(tiny_model("sd2"), method(), config(data, tmp_path / "b", resume=tmp_path / "ti"))
    assert not (tmp_path / "b").exists()


def test_cli(tiny_model, data, tmp_path, capsys):
    model = str(tiny_model("sd1"))
    base = ["train", "textual-inversion", model, "--data", str(data), "--resolution", "32", "--steps", "2",
            "--seed", "0", "--no-progress"]
    assert cli.main(base + ["--output", str(tmp_path / "o"), "--token", TOKEN, "--initializer-token", "a",
                            "--num-vectors", "2", "--learnable-property", "style", "--format", "diffusers"]) == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["learned_embeds.safetensors"]
    assert load_file(str(tmp_path / "o" / "learned_embeds.safetensors"))[TOKEN].shape[0] == 2
    capsys.readouterr()
    assert cli.main(base + ["--output", str(tmp_path / "p"), "--initializer-token", "a"]) == 2
    assert "token: expected the placeholder token" in capsys.readouterr().err
    assert cli.main(base + ["--output", str(tmp_path / "p"), "--token", TOKEN, "--initializer-token", "cat"]) == 2
    assert "initializer_token: 'cat' is 3 tokens" in capsys.readouterr().err
