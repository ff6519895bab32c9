"""Generating one item on one device: the same code in a single process, on each torchrun or
accelerate rank and in each Ray actor, so every way of running gives the same bytes."""
from __future__ import annotations

import io

from .manifest import Output

__all__ = ["Worker", "ItemError"]


class ItemError(RuntimeError):
    """An item failed while generating (e.g. NaN, out of memory); the items finished before it
    are kept."""


class Worker:
    """Generates items with ``folders`` (a ``request.Folders``) on ``device`` in ``dtype``
    (strings, as the command line takes them: resolved where the worker runs), keeping the
    last model's pipeline loaded."""

    def __init__(self, folders, device: str = "auto", dtype: str = "auto"):
        from ..cli import UsageError, _device_and_dtype

        self.folders = folders
        try:
            self.device, self.dtype = _device_and_dtype(device, dtype)
        except UsageError as e:  # a ValueError for every caller (a Ray actor too)
            raise ValueError(str(e)) from None
        self._pipe, self._model = None, None

    def pipeline(self, model):
        """The pipeline of ``model`` (a path; None: the demo model), loaded when it changes."""
        from ..demo import default_model_path
        from ..pipeline import Pipeline

        path = model if model is not None else default_model_path()
        if self._pipe is None or path != self._model:
            self._pipe = None  # free the last model first
            self._pipe = Pipeline.from_pretrained(path, device=self.device, dtype=self.dtype)
            self._pipe.progress = False  # the batch shows one bar over items
            self._model = path
        return self._pipe

    def generate(self, item) -> list[Output]:
        """The item's images, encoded as PNGs with their infotext."""
        from ..png import write_png
        from ..request import parse

        request = parse(dict(item.data), folders=self.folders)
        outputs = []
        for result in request.run(self.pipeline(request.model)):
            buf = io.BytesIO()
            write_png(result.image, buf, result.parameters)
            outputs.append(Output(buf.getvalue(), result.seed, result.parameters))
        return outputs

    def run(self, item) -> tuple[str, list[Output]]:
        """``(item.id, its outputs)``; a failure is an :class:`ItemError` naming the line."""
        try:
            return item.id, self.generate(item)
        except (ValueError, RuntimeError, FloatingPointError) as e:
            raise ItemError(f"line {item.line} (item {item.id}): {e}") from e
