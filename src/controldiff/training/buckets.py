"""Aspect-ratio buckets, as kohya sd-scripts' ``make_bucket_resolutions`` / ``select_bucket``:
sizes of about ``resolution²`` pixels with sides multiples of ``step`` from ``resolution / 2``
to ``2 * resolution`` (kohya's 256 to 1024 at 512); each image goes to the bucket of the
nearest aspect ratio, so wide and tall images train without losing their sides to a square crop."""
from __future__ import annotations

__all__ = ["bucket_sizes", "check_buckets", "nearest_bucket"]


def check_buckets(resolution: int, step) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 8 or step % 8:
        raise ValueError(f"bucket_step: expected a multiple of 8 (the VAE's factor), got {step!r}")
    if resolution % step:
        raise ValueError(f"resolution: with buckets expected a multiple of bucket_step {step}, got {resolution}")


def bucket_sizes(resolution: int, step: int = 64) -> list[tuple[int, int]]:
    """The buckets' (width, height), sorted."""
    area, low, high = resolution * resolution, max(step, resolution // 2 // step * step), 2 * resolution
    sizes = {(resolution, resolution)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], sizes: list[tuple[int, int]]) -> int:
    """The index in ``sizes`` of the bucket whose aspect ratio is nearest the image's (first of ties)."""
    ratio = size[0] / size[1]
    return min(range(len(sizes)), key=lambda i: abs(sizes[i][0] / sizes[i][1] - ratio))
