"""Batch items on a local Ray cluster (one CPU, started once for the module): the same files and
records as the single-process run; and the HTTP API as a Ray Serve deployment, answering a
native job and A1111's txt2img with the images the library makes."""
from __future__ import annotations

import json
import re

import pytest

from controldiff import cli
from test_batch import files, records, setup, single  # noqa: F401 (fixtures)

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_items_on_ray_equal_the_single_process_run(setup, single, cluster, tmp_path, capsys):
    fold, jobs = setup
    out = tmp_path / "ray"
    rc = cli.main(["batch", str(jobs), "--out", str(out), "--model", str(fold.default_model), "--model-dir",
                   str(fold.models[0]), "--device", "cpu", "--dtype", "float32", "--ray", "--no-progress"])
    assert rc == 0 and capsys.readouterr().out == f"generated 5 items (6 images) in {out}; 0 already done\n"
    assert files(out) == files(single[0])
    assert sorted(map(json.dumps, records(out))) == sorted(map(json.dumps, records(single[0])))
    assert ray.is_initialized()  # attached to the running cluster, left running


def test_an_item_failing_on_a_ray_worker_names_its_line(setup, cluster, tmp_path):
    from controldiff.batch import ItemError, run_batch
    from test_batch import FAST, write_jobs

    fold, _ = setup
    # valid as a request; SEGA's default warmup (10 steps) is past a 2-step run: refused when it runs
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a face", **FAST, "controls": [
        {"type": "SEGA", "concepts": [{"prompt": "smiling"}]}]}], None)
    with pytest.raises(ItemError) as e:
        run_batch(jobs, tmp_path / "out", fold, device="cpu", dtype="float32", ray="", progress=False)
    assert type(e.value) is ItemError  # the error itself, not Ray's wrapper with the remote traceback
    assert re.match(r"line 1 \(item 00001-\w+\): Concept.warmup: ", str(e.value))
    assert not list((tmp_path / "out").iterdir())


def test_the_api_on_ray_serve_answers_like_the_library(setup, cluster, tmp_path, pipe, monkeypatch):
    import base64
    import io
    import time

    import httpx
    import numpy as np
    from PIL import Image
    from ray import serve

    from controldiff.batch.ray_serve import app
    from controldiff.request import parse, schema
    from test_batch import FAST
    from test_training_distributed import free_port

    fold, _ = setup
    port = free_port()
    # what `serve run controldiff.batch.ray_serve:app model=... models=...` passes
    args = {"model": str(fold.default_model), "models": ",".join(map(str, fold.models)),
            "outputs": str(tmp_path / "outputs"), "devices": "cpu", "dtype": "float32", "num_cpus": "0"}
    # Serve kills its HTTP proxy if it has not started in 60 s: on 2 loaded cores it can take longer
    # (a guard against a hang, not a speed check)
    monkeypatch.setattr("ray.serve._private.api.HTTP_PROXY_TIMEOUT", 600)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app(args), name="controldiff", route_prefix="/")
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        assert api.get("/controldiff/v1/schema").json() == schema()
        bad = api.post("/controldiff/v1/jobs", json={"prompt": "x", "width": "wide"})
        assert bad.status_code == 422 and "width" in bad.json()["detail"][0]["loc"]

        request = {"prompt": "a red cube", "seed": 7, **FAST}
        job_id = api.post("/controldiff/v1/jobs", json=request).json()["id"]
        deadline = time.monotonic() + 120  # a guard against a hang, not a speed check
        while (job := api.get(f"/controldiff/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["state"] == "done", job
        expected = parse(dict(request), folders=fold).run(pipe)[0]
        (image,) = job["images"]
        png = Image.open(io.BytesIO(api.get(image["url"]).content))
        assert image["seed"] == expected.seed and image["parameters"] == expected.parameters
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(expected.image.convert("RGB")))

        a1111 = api.post("/sdapi/v1/txt2img", json={"prompt": "a red cube", "seed": 7, "steps": 2, "width": 64,
                                                     "height": 64, "batch_size": 2}).json()
        assert [Image.open(io.BytesIO(base64.b64decode(b))).size for b in a1111["images"]] == [(64, 64)] * 2
    finally:
        serve.shutdown()


def test_serve_run_arguments_are_checked_before_any_replica_starts(setup):
    from controldiff.batch.ray_serve import app

    with pytest.raises(ValueError, match="modle: unknown argument"):
        app({"modle": "x"})
    with pytest.raises(ValueError, match="num_replicas: expected a number, got 'two'"):
        app({"num_replicas": "two"})
    with pytest.raises(ValueError, match="--host|token"):
        app({"token": " "})
