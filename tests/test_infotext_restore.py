"""The infotext round trip, complete: hashes as A1111 computes them, ``<lora:...>`` tags as A1111
parses them, our writer and A1111's writer read back by both parsers, and ``generate --from-png``
restoring LoRAs, embeddings, ControlNet settings and the model check on tiny models.

A1111's code (writer, parser, hashes, tag parsing) and sd-webui-controlnet's unit reader are
vendored in tests/reference/a1111_infotext.py.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import reference.a1111_infotext as a1111
from controldiff.loading import hashes
from controldiff.png import (control_fields, control_units, format_hashes, format_parameters, parse_hashes,
                             parse_parameters, read_parameters, write_png)
from controldiff.text.extra_networks import embedding_files, find_file, lora_tags, parse_prompt, used_embeddings
from test_cli import no_model, run  # noqa: F401  (fixture)
from tiny_models import build_controlnet


# ----------------------------------------------------------------------------- hashes


def _random_file(path, n, seed=0):
    path.write_bytes(random.Random(seed).randbytes(n))
    return path


def test_model_hash_is_a1111s(tmp_path):
    ckpt = _random_file(tmp_path / "model.safetensors", 2 * 1024 * 1024 + 12345)  # several 1 MiB blocks
    assert hashes.model_hash(ckpt) == a1111.checkpoint_shorthash(str(ckpt))
    assert len(hashes.model_hash(ckpt)) == 10


def test_model_hash_of_a_folder_is_its_unets(tiny_model):
    folder = tiny_model("sd1")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert hashes.model_hash(folder) == a1111.calculate_sha256(unet)[:10]


def _lora_file(path, seed=0, metadata=None, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(2):
        key = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn{i + 1}_to_q"
        state[f"{key}.lora_down.weight"] = scale * torch.randn(2, 16, generator=g)
        state[f"{key}.lora_up.weight"] = scale * torch.randn(16, 2, generator=g)
    save_file(state, str(path), metadata=metadata)
    return path


def test_lora_hash_is_a1111s(tmp_path):
    plain = _lora_file(tmp_path / "plain.safetensors")
    assert hashes.lora_hash(plain) == a1111.network_on_disk_shorthash(str(plain), {})
    with open(plain, "rb") as f:   # AutoV3: the file without its header, not the whole file
        assert hashes.lora_hash(plain) == a1111.addnet_hash_safetensors(f)[:12] != a1111.calculate_sha256(plain)[:12]
    stored = _lora_file(tmp_path / "stored.safetensors", metadata={"sshs_model_hash": "ab" * 32})
    assert hashes.lora_hash(stored) == a1111.network_on_disk_shorthash(str(stored), {"sshs_model_hash": "ab" * 32})
    assert hashes.lora_hash(stored) == "ab" * 6
    pt = tmp_path / "old.pt"
    torch.save({"x": torch.ones(3)}, pt)
    assert hashes.lora_hash(pt) == a1111.network_on_disk_shorthash(str(pt), {}) == a1111.calculate_sha256(pt)[:12]


def test_embedding_hash_is_a1111s(tmp_path):
    emb = tmp_path / "toy.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(emb))
    assert hashes.embedding_hash(emb) == a1111.embedding_shorthash(str(emb))


def test_hashes_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    f = _random_file(tmp_path / "m.ckpt", 5000)
    calls = []
    real = hashes._stream
    monkeypatch.setattr(hashes, "_stream", lambda files, skip: calls.append(1) or real(files, skip))
    first = hashes.model_hash(f)
    assert hashes.model_hash(f) == first and len(calls) == 1
    _random_file(f, 5001, seed=1)   # changed: hashed again
    assert hashes.model_hash(f) != first and len(calls) == 2
    assert hashes.model_hash(f) == a1111.checkpoint_shorthash(str(f))


def test_bad_safetensors_lora_hash_names_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        hashes.lora_hash(bad)


# ----------------------------------------------------------------------------- <lora:...> tags


PROMPTS = [
    "a cat <lora:style:0.7>, detailed",
    "<lora:a> <lyco:b:0.5> <hypernet:h:1> x <lora:c:te=0.3> <lora:d:0.2:0.9> <lora:e:0.4:unet=0.1>",
    "no tags (word:1.2) [a:b:0.5] [a|b] AND other",
    "<lora:multi:word:1>",   # A1111: positional[1] is "word"
    "broken <lora:> <lora x:1> <:y> <lora:n:te=1=2>",
    "\n<lora:style:1.5>\nline two, <LORA:Upper:1>",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tags_parse_as_a1111(prompt):
    ours, tags = parse_prompt(prompt)
    theirs, networks = a1111.parse_prompt(prompt)
    assert ours == theirs   # the prompt without the tags, otherwise unchanged
    by_kind = {}
    for t in tags:
        by_kind.setdefault(t.kind, []).append(list(t.items))
    assert by_kind == {k: [p.items for p in v] for k, v in networks.items()}
    expected, error = [], False
    for kind in ("lora", "lyco"):
        for params in networks.get(kind, []):
            try:
                name, te, unet, dyn = a1111.lora_multipliers(params)
            except ValueError:
                error = True
                continue
            expected.append((name, te, unet))
    if error:
        with pytest.raises(ValueError, match="prompt: <l"):
            lora_tags(tags)
    else:
        assert sorted((t.name, t.te, t.unet) for t in lora_tags(tags)) == sorted(expected)


def test_lora_tag_errors_name_the_tag():
    for prompt, match in (("<lora:x:abc>", r"<lora:x:abc>: the te multiplier"),
                          ("<lora:x:inf>", "finite"),
                          ("<lora:x:1:unet=nan>", "unet multiplier"),
                          ("<lora:x:1:1:8>", "dyn"), ("<lora:x:dyn=8>", "dyn"), ("<lora: :1>", "no name")):
        with pytest.raises(ValueError, match=match):
            lora_tags(parse_prompt(prompt)[1])


def test_find_file_and_embedding_names(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for name in ("a/sub/Style.SafeTensors", "a/old.pt", "b/Style.safetensors", "b/notes.txt", "b/x.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    dirs = [tmp_path / "a", tmp_path / "b"]
    assert find_file("Style", dirs) == tmp_path / "a/sub/Style.SafeTensors"   # first folder given wins
    assert find_file("style", dirs) is None                                   # the name's case matters
    assert find_file("x", dirs) == tmp_path / "b/x.ckpt" and find_file("notes", dirs) is None
    files = embedding_files(dirs)
    assert files == {"Style": tmp_path / "a/sub/Style.SafeTensors", "old": tmp_path / "a/old.pt"}
    assert used_embeddings(["a (Style:1.2), old_man", "older"], files) == ["Style"]
    assert used_embeddings(["x,old"], files) == ["old"] and used_embeddings(["style"], files) == []


# ----------------------------------------------------------------------------- writer and parser


def _text(rng, empty=True):
    alphabet = ["a", "b", "Z", " ", ",", ":", '"', "\\", "\n", "\t", "é", "猫", "(", ")", "[", "]", "<", ">", "=",
                "y", "1", ".", "-", "/", "'"]   # no "x": "1x2" reads as a size
    n = rng.randrange(0 if empty else 1, 12)
    return "".join(rng.choice(alphabet) for _ in range(n))


def _prompt(rng):
    # what an infotext can carry: lines without surrounding spaces, none starting "Negative prompt:"
    lines = [_text(rng).replace("\n", " ").strip() for _ in range(rng.randrange(1, 3))]
    return "\n".join(line for line in lines if line) or "p"


def _settings(rng):
    extra = {"Schedule type": rng.choice(["Karras", "Exponential"]), "Denoising strength": rng.random(),
             "Lora": f"a:{rng.random():g} b:1", "Lora hashes": format_hashes({"a": "0123456789ab", "b,c:": "ff"}),
             "TI hashes": format_hashes({"toy": "abcdefabcdef"}), "Clip skip": rng.randrange(1, 4),
             "Prompt syntax": "compel", "Version": "controldiff 1.0"}
    extra.update(control_fields([{"name": "ControlNet", "model": f"cn{rng.randrange(3)}", "scale": rng.random(),
                                  "start": 0.0, "end": 1.0, "guess_mode": rng.random() < 0.5},
                                 {"name": "SEGA", "concepts": [_text(rng)], "scale": rng.random()}]))
    extra.update({f"Free {i}": _text(rng) for i in range(3)})
    return dict(prompt=_prompt(rng), negative_prompt=rng.choice([None, _prompt(rng)]), steps=rng.randrange(1, 150),
                sampler=rng.choice(["Euler a", "DPM++ 2M", "LCM"]), cfg_scale=rng.choice([7, 7.5, 1.25]),
                seed=rng.randrange(2**64), width=64 * rng.randrange(1, 32), height=64 * rng.randrange(1, 32),
                model=rng.choice([None, "v1-5", "my model, v2: final"]), extra=extra,
                model_hash=rng.choice([None, "0123456789"]))


def test_format_then_parse_gives_every_field_back_in_ours_and_a1111s():
    rng = random.Random(0)
    for _ in range(400):
        s = _settings(rng)
        text = format_parameters(**s)
        ours, theirs = parse_parameters(text), a1111.parse_generation_parameters(text)
        assert {k: v for k, v in ours.items() if k != "Size"} == theirs, text
        expected = {"Prompt": s["prompt"], "Negative prompt": s["negative_prompt"] or "", "Steps": str(s["steps"]),
                    "Sampler": s["sampler"], "CFG scale": str(s["cfg_scale"]), "Seed": str(s["seed"]),
                    "Size": f"{s['width']}x{s['height']}", "Size-1": str(s["width"]), "Size-2": str(s["height"])}
        if s["model"]:
            expected["Model"] = s["model"]
        if s["model_hash"]:
            expected["Model hash"] = s["model_hash"]
        expected.update({k: str(v) for k, v in s["extra"].items() if str(v)})   # empty: left out, as A1111
        assert ours == expected, text


def test_a1111s_writer_reads_in_ours_and_ours_writes_the_same_text():
    rng = random.Random(1)
    for _ in range(300):
        s = _settings(rng)
        params = {"Steps": s["steps"], "Sampler": s["sampler"], "CFG scale": s["cfg_scale"], "Seed": s["seed"],
                  "Size": f"{s['width']}x{s['height']}", "Model hash": s["model_hash"], "Model": s["model"],
                  **s["extra"]}
        text = a1111.create_infotext_text(s["prompt"], s["negative_prompt"], params)
        assert {k: v for k, v in parse_parameters(text).items() if k != "Size"} == \
            a1111.parse_generation_parameters(text)
        # our writer quotes what A1111 quotes; it quotes more only where A1111's text would not read back
        if all(str(v) == str(v).strip() and not str(v).startswith('"') and str(v) for v in params.values()
               if v is not None):
            assert format_parameters(**s) == text


def test_control_units_read_as_sd_webui_controlnet_reads_them():
    theirs_written = a1111.serialize_unit({"enabled": True, "module": "canny", "model": "control_sd15_canny [fef5e48e]",
                                           "weight": 0.75, "image": None, "resize_mode": "Crop and Resize",
                                           "processor_res": 512, "threshold_a": 100, "threshold_b": -1,
                                           "guidance_start": 0.1, "guidance_end": 0.9, "pixel_perfect": False,
                                           "control_mode": "Balanced"})
    ours_written = control_fields([{"name": "ControlNet", "model": "path/cn", "scale": 0.5, "start": 0.2, "end": 0.7}])
    fields = parse_parameters(format_parameters("p", None, 2, "Euler", 7, 1, 64, 64, extra={
        "ControlNet 0": theirs_written, **{"ControlNet 1": ours_written["ControlNet 0"]}}))
    units = control_units(fields)
    for i in (0, 1):
        unit = a1111.parse_unit(fields[f"ControlNet {i}"])
        assert {a1111.displaytext_to_field(k): a1111.parse_value(v) for k, v in units[i].items()} == \
            {k: v for k, v in unit.items() if k != "enabled"}
    assert units[1] == {"Module": "none", "Model": "cn", "Weight": "0.5", "Guidance Start": "0.2",
                        "Guidance End": "0.7", "Control Mode": "Balanced"}
    with pytest.raises(ValueError, match="ControlNet 0"):
        control_units({"ControlNet 0": "Module canny"})


def test_hash_fields_read_as_a1111_writes_them():
    text = a1111.lora_hashes_text([("style", "0123456789ab"), ("a:b,c", "ffffffffffff"), ("", "x"), ("n", "")])
    assert parse_hashes(text) == {"style": "0123456789ab", "abc": "ffffffffffff"}
    assert format_hashes({"style": "0123456789ab", "a:b,c": "ffffffffffff"}) == text
    ti = a1111.ti_hashes_text({"toy": "abcabcabcabc"}, existing=a1111.ti_hashes_text({"neg": "121212121212"}))
    assert parse_hashes(ti) == {"toy": "abcabcabcabc", "neg": "121212121212"}


# ----------------------------------------------------------------------------- generate --from-png


FAST = ["--steps", "2", "--seed", "5"]


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """A tiny SD1 model, a LoRA folder, an embedding folder, a ControlNet and its image."""
    root = tmp_path_factory.mktemp("restore")
    (root / "loras").mkdir()
    (root / "other").mkdir()
    (root / "emb").mkdir()
    _lora_file(root / "loras" / "style.safetensors", scale=3.0)
    _lora_file(root / "other" / "style.safetensors", seed=1, scale=3.0)   # same name, other file
    g = torch.Generator().manual_seed(3)
    save_file({"emb_params": 3 * torch.randn(2, 32, generator=g)}, str(root / "emb" / "toy.safetensors"))
    folder = tiny_model("sd1")
    build_controlnet(folder, root / "cn")
    Image.new("RGB", (64, 64), "white").save(root / "edges.png")
    return {"model": folder, "root": root}


def _gen(capsys, files, out, *argv):
    rc, stdout, err = run(capsys, "generate", files["model"], *argv, "-o", out, "--overwrite")
    assert rc == 0, err
    return err


def test_lora_tag_equals_lora_option_and_from_png_remakes_it(files, tmp_path, capsys):
    root = files["root"]
    tag, opt, none = tmp_path / "tag.png", tmp_path / "opt.png", tmp_path / "none.png"
    _gen(capsys, files, tag, "-p", "a cat <lora:style:0.7>", "--lora-dir", root / "loras", *FAST)
    _gen(capsys, files, opt, "-p", "a cat ", "--lora", f"{root / 'loras' / 'style.safetensors'}:0.7", *FAST)
    _gen(capsys, files, none, "-p", "a cat ", *FAST)
    assert np.array_equal(_pixels(tag), _pixels(opt)) and not np.array_equal(_pixels(tag), _pixels(none))
    p = parse_parameters(read_parameters(tag))
    assert p["Prompt"] == "a cat <lora:style:0.7>"   # the prompt as given, tag included, as A1111 records it
    assert p["Lora hashes"] == f"style: {hashes.lora_hash(root / 'loras' / 'style.safetensors')}" and "Lora" not in p
    assert p["Model hash"] == hashes.model_hash(files["model"])
    again = tmp_path / "again.png"
    _gen(capsys, files, again, "--from-png", tag, "--lora-dir", root / "loras")
    assert np.array_equal(_pixels(again), _pixels(tag))
    # our own --lora PNG ("Lora: style:0.7") is restored from --lora-dir too
    _gen(capsys, files, again, "--from-png", opt, "--lora-dir", root / "loras")
    assert np.array_equal(_pixels(again), _pixels(opt))
    # a file of that name with another hash: a warning naming both hashes
    err = _gen(capsys, files, again, "--from-png", tag, "--lora-dir", root / "other")
    assert (f"LoRA style of hash {hashes.lora_hash(root / 'loras' / 'style.safetensors')}" in err
            and f"has hash {hashes.lora_hash(root / 'other' / 'style.safetensors')}" in err)
    assert not np.array_equal(_pixels(again), _pixels(tag))
    rc, _, err = run(capsys, "generate", files["model"], "--from-png", tag, "-o", tmp_path / "x.png")
    assert rc == 2 and "<lora:style:0.7>" in err and "no --lora-dir given" in err


def test_repeated_tags_add_their_weights(files, tmp_path, capsys):
    twice, once = tmp_path / "twice.png", tmp_path / "once.png"
    d = files["root"] / "loras"
    _gen(capsys, files, twice, "-p", "a cat <lora:style:0.25><lyco:style:te=0.5>", "--lora-dir", d, *FAST)
    _gen(capsys, files, once, "-p", "a cat ", "--lora", f"{d / 'style.safetensors'}:0.75", *FAST)
    assert np.array_equal(_pixels(twice), _pixels(once))


def test_embedding_dir_loads_the_words_of_the_prompt(files, tmp_path, capsys):
    root = files["root"]
    emb = root / "emb" / "toy.safetensors"
    by_dir, by_opt = tmp_path / "dir.png", tmp_path / "opt.png"
    _gen(capsys, files, by_dir, "-p", "a (toy:1.1) cat", "-n", "blurry", "--embedding-dir", root / "emb", *FAST)
    _gen(capsys, files, by_opt, "-p", "a (toy:1.1) cat", "-n", "blurry", "--embedding", f"{emb}:toy", *FAST)
    assert np.array_equal(_pixels(by_dir), _pixels(by_opt))
    p = parse_parameters(read_parameters(by_dir))
    assert p["TI hashes"] == f"toy: {hashes.embedding_hash(emb)}" and "TI" not in p
    again = tmp_path / "again.png"
    _gen(capsys, files, again, "--from-png", by_dir, "--embedding-dir", root / "emb")
    assert np.array_equal(_pixels(again), _pixels(by_dir))
    err = _gen(capsys, files, again, "--from-png", by_dir)   # not loaded: said, with the option that loads it
    assert f"embedding toy (hash {hashes.embedding_hash(emb)}), not loaded here; pass --embedding-dir" in err
    unused = tmp_path / "unused.png"
    _gen(capsys, files, unused, "-p", "a toys cat", "--embedding-dir", root / "emb", *FAST)
    assert "TI hashes" not in parse_parameters(read_parameters(unused))


def test_model_hash_mismatch_warns_naming_both(files, tiny_model, tmp_path, capsys):
    first = tmp_path / "first.png"
    _gen(capsys, files, first, "-p", "a cat", *FAST)
    other = tiny_model("sd1", seed=1)
    err = _gen(capsys, {"model": other}, tmp_path / "o.png", "--from-png", first)
    assert (f"Model hash {hashes.model_hash(files['model'])}" in err and f"has hash {hashes.model_hash(other)}" in err
            and "warning" in err)
    err = _gen(capsys, files, tmp_path / "same.png", "--from-png", first)
    assert "warning" not in err


def test_controlnet_settings_come_back_for_the_same_model(files, tmp_path, capsys):
    root = files["root"]
    cn = f"{root / 'cn'}:{root / 'edges.png'}"
    first, again, plain = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "plain.png"
    _gen(capsys, files, first, "-p", "a cat", "--controlnet", f"{cn}:0.5", *FAST)
    _gen(capsys, files, again, "--from-png", first, "--controlnet", cn)
    _gen(capsys, files, plain, "-p", "a cat", "--controlnet", cn, *FAST)
    assert np.array_equal(_pixels(again), _pixels(first)) and not np.array_equal(_pixels(plain), _pixels(first))
    # A1111's unit (sd-webui-controlnet's fields, the model with its hash): weight, start and end
    a1111_png = tmp_path / "a1111.png"
    unit = a1111.serialize_unit({"module": "canny", "model": "cn [0a1b2c3d]", "weight": 0.6, "guidance_start": 0.25,
                                 "guidance_end": 0.75, "control_mode": "Balanced"})
    text = a1111.create_infotext_text("a cat", None, {"Steps": 2, "Sampler": "Euler a", "CFG scale": 7, "Seed": 5,
                                                      "Size": "64x64", "ControlNet 0": unit})
    with open(a1111_png, "wb") as f:
        write_png(Image.new("RGB", (8, 8)), f, text)
    _gen(capsys, files, again, "--from-png", a1111_png, "--controlnet", cn)
    units = control_units(parse_parameters(read_parameters(again)))
    assert {k: units[0][k] for k in ("Weight", "Guidance Start", "Guidance End")} == \
        {"Weight": "0.6", "Guidance Start": "0.25", "Guidance End": "0.75"}
    _gen(capsys, files, again, "--from-png", a1111_png, "--controlnet", f"{cn}:0.9")   # SCALE given wins
    units = control_units(parse_parameters(read_parameters(again)))
    assert (units[0]["Weight"], units[0]["Guidance Start"]) == ("0.9", "0.25")
    err = _gen(capsys, files, again, "--from-png", a1111_png)
    assert "was made with ControlNet 0 (Module: canny, Model: cn [0a1b2c3d]" in err and "no control image" in err


@pytest.mark.parametrize("argv, match", [
    (["-p", "x <lora:nothere:1>", "--lora-dir", "{loras}"], "<lora:nothere:1>: no LoRA file nothere.safetensors"),
    (["-p", "x <lora:style:abc>", "--lora-dir", "{loras}"], "<lora:style:abc>: the te multiplier"),
    (["-p", "x <lora:style:1:0.5>", "--lora-dir", "{loras}"], "separate text-encoder and UNet weights"),
    (["-p", "x", "--lora-dir", "{root}/missing"], "argument --lora-dir: folder not found"),
    (["-p", "x", "--embedding-dir", "{root}/missing"], "argument --embedding-dir: folder not found"),
    (["-p", "x <lora:style>", "--lora-dir", "{loras}", "--lora", "{loras}/style.safetensors"],
     "--lora: style is also in the prompt"),
])
def test_errors_before_the_model_loads(files, tmp_path, capsys, no_model, argv, match):  # noqa: F811
    argv = [a.format(root=files["root"], loras=files["root"] / "loras") for a in argv]
    rc, _, err = run(capsys, "generate", files["model"], *argv, "-o", tmp_path / "o.png")
    assert rc == 2 and match in err and "Traceback" not in err
    if "nothere" in match:
        assert str(files["root"] / "loras") in err   # the folders searched


def test_unreadable_control_unit_is_a_warning(files, tmp_path, capsys):
    src = tmp_path / "src.png"
    with open(src, "wb") as f:
        write_png(Image.new("RGB", (8, 8)), f, 'x\nSteps: 2, Sampler: Euler, CFG scale: 6, Seed: 4, Size: 64x64, '
                  'ControlNet 0: "legacy unit"')
    err = _gen(capsys, files, tmp_path / "o.png", "--from-png", src)
    assert "ControlNet unit that cannot be read" in err


def test_hypernet_tags_are_left_out_with_a_note(files, tmp_path, capsys):
    with_tag, without = tmp_path / "a.png", tmp_path / "b.png"
    err = _gen(capsys, files, with_tag, "-p", "a cat<hypernet:h:1>", *FAST)
    _gen(capsys, files, without, "-p", "a cat", *FAST)
    assert "<hypernet:h:1> left out of the prompt" in err and np.array_equal(_pixels(with_tag), _pixels(without))
