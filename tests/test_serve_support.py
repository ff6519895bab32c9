"""What the server tests share (no tests here): model folders for a server, and the real app
run by uvicorn in a thread on a free port."""
from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
from safetensors.torch import save_file

from controldiff.serve import ServerConfig, create_app
from tiny_models import build_controlnet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(config: ServerConfig, host: str = "127.0.0.1"):
    """The app for ``config`` served on ``host``; yields its port (reach it on 127.0.0.1)."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(config), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(400):
        if srv.started or not thread.is_alive():
            break
        time.sleep(0.025)
    assert srv.started, "the server did not start"
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(timeout=20)


def folders(root: Path, model: Path, controlnet: bool = False) -> dict:
    """A models folder holding the tiny model as "tiny", a LoRA and an embedding folder (one file
    each), a ControlNet folder ("cn", shaped after the model) when asked, an outputs folder."""
    root = Path(root)
    shutil.copytree(model, root / "models" / "tiny")
    (root / "loras").mkdir()
    (root / "embeddings").mkdir()
    (root / "controlnets").mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(1, 32, generator=g)}, str(root / "embeddings" / "shiny.safetensors"))
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 1)},
              str(root / "loras" / "style.safetensors"))
    if controlnet:
        build_controlnet(model, root / "controlnets" / "cn")
    return dict(model=root / "models" / "tiny", models=[root / "models"], loras=[root / "loras"],
                embeddings=[root / "embeddings"], controlnets=[root / "controlnets"], outputs=root / "outputs",
                devices=("cpu",))


def saved(outputs: Path) -> list[Path]:
    return sorted(Path(outputs).glob("*.png"))
