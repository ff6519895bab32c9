"""AUTOMATIC1111's sampler names, as its UI, API and infotexts write them, and ours.

A1111 writes ``Sampler: DPM++ 2M`` and, since 1.9, ``Schedule type: Karras`` separately;
older files write ``Sampler: DPM++ 2M Karras``. Both read the same.
"""
from __future__ import annotations

from typing import Optional

# ours -> (A1111 sampler, A1111 schedule type or None)
TO_A1111: dict[str, tuple[str, Optional[str]]] = {
    "euler": ("Euler", None), "euler_a": ("Euler a", None), "euler_karras": ("Euler", "Karras"),
    "heun": ("Heun", None), "lms": ("LMS", None), "ddim": ("DDIM", None), "pndm": ("PLMS", None),
    "ddpm": ("DDPM", None), "unipc": ("UniPC", None), "dpmpp_2m": ("DPM++ 2M", None),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"), "dpmpp_2m_sde": ("DPM++ 2M SDE", None),
    "dpmpp_2m_sde_karras": ("DPM++ 2M SDE", "Karras"), "lcm": ("LCM", None), "deis": ("DEIS", None),
    "dpmpp_sde": ("DPM++ SDE", None), "dpmpp_sde_karras": ("DPM++ SDE", "Karras"),
    "dpmpp_2s_a": ("DPM++ 2S a", None), "dpmpp_2s_a_karras": ("DPM++ 2S a", "Karras"),
}  # the rest (tcd, dpmpp_2s: A1111 has no such sampler) keep our names
_FROM_A1111 = {(s.lower(), (t or "").lower()): ours for ours, (s, t) in TO_A1111.items()}


def from_a1111(sampler: str, schedule: Optional[str] = None) -> Optional[str]:
    """Our scheduler name for an A1111 sampler (and schedule type), or None if we have none.
    Our own names are accepted too; "Automatic" and an absent schedule mean the sampler's default."""
    s = sampler.strip()
    t = (schedule or "").strip()
    if t.lower() in ("automatic", "uniform"):
        t = ""
    if s in TO_A1111 and not t:
        return s
    if not t and s.lower().endswith(" karras"):   # A1111 before 1.9
        s, t = s[:-len(" karras")], "Karras"
    return _FROM_A1111.get((s.lower(), t.lower()))
