"""Training on several processes (training/distributed.py): ``torchrun --nproc_per_node 2`` on
CPUs (gloo) with a batch of 1 per process trains the LoRA as one process with a batch of 2
(the same data order, crops, noise and timesteps; the summed per-rank gradients are the
2-image batch's), including a short last batch that leaves rank 1 idle and the next epoch;
only rank 0 writes files; a checkpoint of 2 processes resumes on 1."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from controldiff.training import LoRA, train
from controldiff.training.distributed import Processes
from test_training import config, photos, same_files

WEIGHTS = "pytorch_lora_weights.safetensors"
KW = dict(steps=3, lr=1e-4, format="diffusers")  # 3 images: batches of 2, then 1 (rank 1 idle), then a new epoch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def two_processes(tiny_model, data, tmp_path_factory):
    """``torchrun --nproc_per_node 2 -m controldiff.cli train lora ... --batch-size 1``."""
    out = tmp_path_factory.mktemp("two")
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "controldiff.cli", "train", "lora", str(tiny_model("sd1")),
           "--data", str(data), "--output", str(out), "--prompt", "a photo of sks", "--resolution", "32",
           "--steps", "3", "--seed", "1", "--lr", "1e-4", "--batch-size", "1", "--train-text-encoder",
           "--format", "diffusers", "--checkpoint-every", "1", "--no-progress"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run


def test_two_processes_train_as_one_process_with_their_global_batch(tiny_model, data, two_processes, tmp_path):
    out, run = two_processes
    model = tiny_model("sd1")
    one = train(model, LoRA(train_text_encoder=True), config(data, tmp_path / "one", batch_size=2,
                                                             checkpoint_every=1, **KW))
    diff = same_files(tmp_path / "one" / WEIGHTS, out / WEIGHTS)
    assert diff <= 1e-5
    # the comparison can fail: one process with a batch of 1 (no summed gradients) trains otherwise
    train(model, LoRA(train_text_encoder=True), config(data, tmp_path / "alone", batch_size=1, **KW))
    assert same_files(tmp_path / "alone" / WEIGHTS, out / WEIGHTS) > 100 * max(diff, 1e-6)
    # only rank 0 wrote files and reported (the global batch's loss)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert run.stderr.count("last loss") == 1 and f"last loss {one.losses[-1]:.4f}" in run.stderr
    assert run.stdout.split() == [str(out / WEIGHTS)]


def test_a_checkpoint_of_two_processes_resumes_on_one(tiny_model, data, two_processes, tmp_path):
    out, _ = two_processes
    model = tiny_model("sd1")
    resumed = train(model, LoRA(train_text_encoder=True), config(data, tmp_path, batch_size=2,
                                                                 resume=out / "checkpoint-1", **KW))
    assert len(resumed.losses) == 2
    assert same_files(tmp_path / WEIGHTS, out / WEIGHTS) <= 1e-5


def test_each_rank_takes_its_rows_of_the_global_batch():
    ranks = [Processes(rank, 2) for rank in range(2)]
    assert [p.rows(4, 2) for p in ranks] == [[0, 1], [2, 3]]
    assert [p.rows(3, 2) for p in ranks] == [[0, 1], [2]]         # a short last batch
    assert [p.rows(1, 1) for p in ranks] == [[0], []]             # rank 1 idle
    assert [p.rows(4, 1, halves=2) for p in ranks] == [[0, 2], [1, 3]]  # instances, then class images
    assert Processes().rows(4, 2) is None                         # one process: the whole batch
