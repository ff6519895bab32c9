"""Hostile inputs shared by the tests: a pickle that runs code when unpickled."""
from __future__ import annotations

from pathlib import Path


class Evil:
    """Unpickling this creates ``marker``: a test asserts the file never appears."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))
