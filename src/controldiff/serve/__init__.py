"""``controldiff serve``: an HTTP API (A1111-compatible and native), a queue and a web page.

``create_app(ServerConfig(...))`` builds the FastAPI application (FastAPI is imported only then,
so the rest of the package works without the ``serve`` extra).
"""
from __future__ import annotations

from .config import ServerConfig

__all__ = ["create_app", "ServerConfig"]


def create_app(config: ServerConfig):
    """The FastAPI application for ``config`` (:func:`controldiff.serve.app.create_app`)."""
    from .app import create_app as make

    return make(config)
