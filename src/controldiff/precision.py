"""Which dtype ``dtype="auto"`` means on this machine.

CUDA: float16 (what SD checkpoints are made for; the SDXL VAE is kept in float32 where its
config asks, see ``Pipeline``). CPU: bfloat16 where the CPU computes it natively (AVX512-BF16
or AMX on x86, the BF16 extension on ARM), where a UNet step runs ~2.5x faster than in float32
and images stay within bf16 tolerance; float32 elsewhere, where bf16 is emulated and slower.
The sampling loop keeps the latents and the scheduler's arithmetic in float32 whatever the
model's dtype (``sampling/loop.py``).
"""
from __future__ import annotations

import os
from typing import Union

import torch

NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CAPABILITIES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")  # torch.cpu.get_capabilities() keys
LATENT_DTYPE = torch.float32   # the loop's latents, guidance and scheduler arithmetic, whatever the UNet runs in
FORCE_ENV = "CONTROLDIFF_CPU_BF16"   # "1"/"0": say whether the CPU has native bf16 (tests, odd machines)


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bfloat16 instructions (not oneDNN's emulation on plain AVX512),
    by torch's own CPU feature probe; ``CONTROLDIFF_CPU_BF16=1/0`` overrides it."""
    forced = os.environ.get(FORCE_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"{FORCE_ENV}: expected 0 or 1, got {forced!r}")
        return forced == "1"
    probe = getattr(torch.cpu, "get_capabilities", None)   # torch >= 2.9
    caps = probe() if probe is not None else {}
    return any(caps.get(name, False) is True for name in CAPABILITIES)


def resolve_dtype(dtype: Union[str, torch.dtype], device: Union[str, torch.device] = "cpu") -> torch.dtype:
    """The torch dtype for ``dtype`` ("auto", a name in ``NAMES``, or a floating torch dtype)
    on ``device``: "auto" is float16 on CUDA, bfloat16 on a CPU with native bf16, else float32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in NAMES.values():
            raise ValueError(f"dtype: expected one of {', '.join(NAMES)} or 'auto', got {dtype}")
        return dtype
    if not isinstance(dtype, str) or (dtype != "auto" and dtype not in NAMES):
        raise ValueError(f"dtype: expected 'auto', one of {', '.join(NAMES)} or a torch dtype, got {dtype!r}")
    if dtype != "auto":
        return NAMES[dtype]
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16
    if kind == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32
