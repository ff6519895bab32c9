"""What a server is given: where names resolve, where images go, who may call it, how much it accepts."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["ServerConfig", "is_loopback"]

MiB = 1024 * 1024


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass
class ServerConfig:
    """One server's settings (``controldiff serve`` fills it from its options).

    ``model``: the default model (None: the embedded demo model); ``models`` ... ``controlnets``:
    the folders names in requests resolve in; ``outputs``: where every image is saved;
    ``devices``: one worker each ("auto": cuda if available, else cpu); ``token``: required as
    ``Authorization: Bearer TOKEN`` (or HTTP basic auth with it as the password) on every route;
    without one the server only binds a loopback ``host``."""

    model: Optional[Path] = None
    models: list[Path] = field(default_factory=list)
    loras: list[Path] = field(default_factory=list)
    embeddings: list[Path] = field(default_factory=list)
    controlnets: list[Path] = field(default_factory=list)
    outputs: Path = Path("outputs")
    host: str = "127.0.0.1"
    port: int = 7860
    token: Optional[str] = None
    devices: tuple[str, ...] = ("auto",)
    dtype: str = "auto"
    max_upload_bytes: int = 64 * MiB     # a whole request body
    max_pixels: int = 2048 * 2048        # an uploaded image, and width * height of an output
    max_images: int = 64                 # per request (controldiff.request.Limits' defaults)
    preview_every: int = 2               # steps between preview images (0: none)
    keep_jobs: int = 1000                # finished jobs remembered (oldest forgotten first)

    def check(self) -> None:
        """Refuse settings that would expose the server: a non-loopback host needs a token."""
        if not is_loopback(self.host) and not self.token:
            raise ValueError(f"--host {self.host}: binding an address other machines reach needs a token "
                             "(--token or $CONTROLDIFF_TOKEN); without one only 127.0.0.1 is allowed")
        if self.token is not None and not self.token.strip():
            raise ValueError("--token: expected a non-empty token")
        for name in ("max_upload_bytes", "max_pixels", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
