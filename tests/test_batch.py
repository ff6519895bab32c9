"""``controldiff batch`` (controldiff/batch/): five requests of a jobs file on a tiny model; each
item equals its request run alone; a run stopped after item 2 resumes without touching items
1-2 and ends equal to an uninterrupted run; two torchrun processes write the same files as one;
a failed rank spoils nothing; every bad line is named, with its field, before any model loads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controldiff import cli
from controldiff.batch import MANIFEST, Manifest, Shard, Worker, read_jobs, run_batch
from controldiff.batch.jobs import item
from controldiff.png import read_parameters
from pipes import ours

FAST = {"width": 64, "height": 64, "num_inference_steps": 2}
JOBS = [
    {"prompt": "a red cube", "seed": 7, **FAST},
    {"prompt": "a blue ball", **FAST},                                       # no seed: one from the line
    {"prompt": "a green tree", "negative_prompt": "blurry", "num_images": 2, **FAST},
    {"prompt": "a face", "controls": [{"type": "SEGA", "concepts": [{"prompt": "smiling", "scale": 5, "warmup": 0}]}],
     "seed": 3, **FAST},
    {"prompt": "a red cube", "model": "tiny", **FAST},                      # the same text as line 1, no seed
]
IMAGES = 6  # line 3 asks for two


def folders(root: Path, model: Path):
    from controldiff.request import Folders

    models = root / "models"
    if not (models / "tiny").exists():
        shutil.copytree(model, models / "tiny")
    return Folders(models=[models], loras=[], embeddings=[], controlnets=[], default_model=model)


def write_jobs(path: Path, jobs=JOBS, blank_line_at: int | None = 2) -> Path:
    lines = [json.dumps(j) for j in jobs]
    if blank_line_at is not None:
        lines.insert(blank_line_at, "")  # blank lines are skipped, line numbers still count them
    path.write_text("\n".join(lines) + "\n")
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.png")}


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


@pytest.fixture(scope="session")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    return folders(root, tiny_model("sd1")), write_jobs(root / "jobs.jsonl")


@pytest.fixture(scope="session")
def single(setup, tmp_path_factory):
    """The uninterrupted single-process run everything else is compared with."""
    fold, jobs = setup
    out = tmp_path_factory.mktemp("single")
    summary = run_batch(jobs, out, fold, device="cpu", dtype="float32", shard=Shard(), progress=False)
    return out, summary


def test_every_item_is_made_as_its_request_alone(setup, single, pipe):
    from controldiff.request import parse

    fold, jobs = setup
    out, summary = single
    assert (summary.generated, summary.images, summary.skipped) == (5, IMAGES, 0)
    items = read_jobs(jobs, fold)
    assert [it.line for it in items] == [1, 2, 4, 5, 6]
    recs = records(out)
    assert sorted(r["id"] for r in recs) == sorted(it.id for it in items)
    assert sorted(files(out)) == sorted(im["file"] for r in recs for im in r["images"])
    by_id = {r["id"]: r for r in recs}
    pipes = {fold.default_model: pipe, fold.models[0] / "tiny": ours(fold.models[0] / "tiny")}
    for it in items:
        rec = by_id[it.id]
        expected = parse(dict(it.data), folders=fold).run(pipes[it.model])  # the same request, run alone
        assert [im["seed"] for im in rec["images"]] == [r.seed for r in expected]
        for im, r in zip(rec["images"], expected):
            path = out / im["file"]
            assert read_parameters(path) == im["parameters"] == r.parameters
            assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(r.image.convert("RGB")))
    seeds = {it.line: by_id[it.id]["images"][0]["seed"] for it in items}
    assert seeds[1] == 7 and seeds[5] == 3                     # given seeds are kept
    assert seeds[2] != seeds[6] and len(set(seeds.values())) == 5  # derived ones differ by line
    assert [im["seed"] for im in by_id[items[2].id]["images"]] == [seeds[4], seeds[4] + 1]
    assert len(set(files(out).values())) == IMAGES             # no two images alike


def test_seeds_and_ids_come_from_the_line_alone():
    a = item(3, {"prompt": "x", "width": 64})
    assert item(3, {"width": 64, "prompt": "x"}) == a                     # key order does not matter
    assert item(3, {"prompt": "x", "seed": -1}).data["seed"] not in (-1, None)  # A1111's "random"
    assert item(4, {"prompt": "x", "width": 64}).data["seed"] != a.data["seed"]
    assert item(3, {"prompt": "y", "width": 64}).id != a.id
    assert item(3, {"prompt": "x", "seed": 5}).data["seed"] == 5
    assert 0 <= a.data["seed"] < 2**32 and a.id.startswith("00003-")


def test_a_stopped_run_resumes_without_redoing_or_rewriting(setup, single, tmp_path, monkeypatch, capsys):
    fold, jobs = setup
    out = tmp_path / "out"
    real = Worker.generate
    calls = []

    def crash_after_two(self, it):
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill during item 3
        calls.append(it.line)
        return real(self, it)

    monkeypatch.setattr(Worker, "generate", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_batch(jobs, out, fold, device="cpu", dtype="float32", shard=Shard(), progress=False)
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert len(records(out)) == 2 and len(first) == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    calls.clear()
    monkeypatch.setattr(Worker, "generate", lambda self, it: calls.append(it.line) or real(self, it))
    capsys.readouterr()
    summary = run_batch(jobs, out, fold, device="cpu", dtype="float32", shard=Shard())
    assert calls == [4, 5, 6] and (summary.generated, summary.skipped) == (3, 2)
    bar = capsys.readouterr().err  # the progress bar starts at the items found done
    assert "batch:  40%" in bar and "2/5" in bar and "batch: 100%" in bar and "5/5" in bar
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png") if p.name in first} == first
    assert files(out) == files(single[0])
    assert sorted(map(json.dumps, records(out))) == sorted(map(json.dumps, records(single[0])))

    calls.clear()
    assert run_batch(jobs, out, fold, device="cpu", dtype="float32", shard=Shard(), progress=False).generated == 0
    assert calls == [] and len(records(out)) == 5  # nothing twice


def test_an_image_left_without_its_record_is_kept_if_equal_never_overwritten(setup, single, tmp_path):
    fold, jobs = setup
    out = tmp_path / "out"
    shutil.copytree(single[0], out)
    lines = (out / MANIFEST).read_text().splitlines()
    last = json.loads(lines[-1])
    # the crash came after the item's images were in place, during its record's write
    (out / MANIFEST).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    kept = {im["file"]: (out / im["file"]).stat().st_ino for im in last["images"]}
    summary = run_batch(jobs, out, fold, device="cpu", dtype="float32", shard=Shard(), progress=False)
    assert summary.generated == 1
    assert {f: (out / f).stat().st_ino for f in kept} == kept
    after = (out / MANIFEST).read_text().splitlines()
    assert json.loads(after[-1]) == last and after[-2] == lines[-1][:20]  # a new line after the torn one
    assert Manifest(out).finished() == {r["id"]: r for r in records(single[0])}

    # one that differs (made elsewhere, or by hand) is not overwritten
    (out / MANIFEST).write_text("\n".join(after[:-2]) + "\n")
    name = next(iter(kept))
    (out / name).write_bytes(b"not this image")
    with pytest.raises(FileExistsError, match=name):
        run_batch(jobs, out, fold, device="cpu", dtype="float32", shard=Shard(), progress=False)
    assert (out / name).read_bytes() == b"not this image"


def test_ranks_split_the_items_and_a_failed_rank_spoils_nothing(setup, single, tmp_path, monkeypatch):
    fold, jobs = setup
    out = tmp_path / "out"
    assert [Shard(r, 2).take(list("abcde")) for r in (0, 1)] == [list("ace"), list("bd")]
    real = Worker.generate

    def fail(self, it):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Worker, "generate", fail)
    with pytest.raises(Exception, match="line 2 .*out of memory"):
        run_batch(jobs, out, fold, device="cpu", dtype="float32", shard=Shard(1, 2), progress=False)
    monkeypatch.setattr(Worker, "generate", real)
    assert run_batch(jobs, out, fold, device="cpu", dtype="float32", shard=Shard(0, 2), progress=False).generated == 3
    # rank 1's items are redone on one process; the rest is kept
    summary = run_batch(jobs, out, fold, device="cpu", dtype="float32", shard=Shard(), progress=False)
    assert (summary.generated, summary.skipped) == (2, 3)
    assert files(out) == files(single[0])


def test_ray_and_a_launcher_are_not_mixed(setup, tmp_path):
    fold, jobs = setup
    with pytest.raises(ValueError, match="--ray: .*WORLD_SIZE > 1"):
        run_batch(jobs, tmp_path / "o", fold, shard=Shard(0, 2), ray="")
    assert not (tmp_path / "o").exists()


def test_shard_from_the_launchers_environment():
    assert Shard.from_env({}) == Shard(0, 1, 0)
    assert Shard.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(3, 4, 1)
    with pytest.raises(ValueError, match="RANK=4, WORLD_SIZE=4"):
        Shard.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE: expected an integer"):
        Shard.from_env({"WORLD_SIZE": "two"})


def test_two_torchrun_processes_write_what_one_process_writes(setup, single, tmp_path):
    from test_training_distributed import free_port

    fold, jobs = setup
    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "controldiff.cli", "batch", str(jobs), "--out", str(out),
           "--model", str(fold.default_model), "--model-dir", str(fold.models[0]), "--device", "cpu",
           "--dtype", "float32", "--no-progress"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(run.stdout.splitlines()) == [f"rank 0 of 2: generated 3 items (4 images) in {out}; 0 already done",
                                               f"rank 1 of 2: generated 2 items (2 images) in {out}; 0 already done"]
    assert files(out) == files(single[0])
    assert sorted(map(json.dumps, records(out))) == sorted(map(json.dumps, records(single[0])))


def test_sigterm_stops_between_writes_and_keeps_the_finished_items(setup, tmp_path):
    """What torchrun does to the other ranks when one fails."""
    import signal
    import time

    fold, _ = setup
    jobs = write_jobs(tmp_path / "long.jsonl", [{"prompt": f"p{i}", **FAST, "num_inference_steps": 150}
                                                for i in range(3)], None)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "controldiff.cli", "batch", str(jobs), "--out", str(out), "--model",
                             str(fold.default_model), "--device", "cpu", "--dtype", "float32", "--no-progress"],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240  # a guard against a hang, not a speed check
    while not (out / MANIFEST).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM; the finished items are kept" in err and "Traceback" not in err
    assert 1 <= len(records(out)) < 3
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == \
        sorted(im["file"] for r in records(out) for im in r["images"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


BAD = [
    {"prompt": "fine", **FAST},
    "{not json",
    {"prompt": "x", "width": "wide"},
    ["a", "list"],
    {"prompt": "x", "model": "../escape"},
]


def test_every_bad_line_is_named_with_its_field_before_any_model_loads(setup, tmp_path, capsys, monkeypatch):
    fold, _ = setup
    jobs = tmp_path / "bad.jsonl"
    jobs.write_text("\n".join(b if isinstance(b, str) else json.dumps(b) for b in BAD) + "\n")

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the lines were checked")

    monkeypatch.setattr("controldiff.pipeline.Pipeline.from_pretrained", forbidden)
    out = tmp_path / "out"
    rc = cli.main(["batch", str(jobs), "--out", str(out), "--model", str(fold.default_model),
                   "--model-dir", str(fold.models[0]), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{jobs}:1:" not in err
    assert f"{jobs}:2: not JSON" in err
    assert f"{jobs}:3: width" in err
    assert f"{jobs}:4: expected a JSON object" in err
    assert f"{jobs}:5: model" in err
    assert not out.exists()  # nothing was made


def test_command_line_errors(setup, tmp_path, capsys):
    fold, jobs = setup
    assert cli.main(["batch", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "JOBS: file not found" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert cli.main(["batch", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no requests" in capsys.readouterr().err
    assert cli.main(["batch", str(jobs), "--out", str(tmp_path / "o"), "--lora-dir", str(tmp_path / "nope")]) == 2
    assert "--lora-dir: not a folder" in capsys.readouterr().err
    assert cli.main(["batch", str(jobs), "--out", str(tmp_path / "o"), "--model", str(fold.default_model),
                     "--model-dir", str(fold.models[0]), "--device", "nope"]) == 2
    assert "argument --device: not a torch device: 'nope'" in capsys.readouterr().err
    assert not list((tmp_path / "o").iterdir())
    assert cli.main(["batch", str(jobs)]) == 2  # --out is required
    assert "--out" in capsys.readouterr().err
