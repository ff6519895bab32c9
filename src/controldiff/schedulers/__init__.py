"""Our own schedulers, each equal step for step to the diffusers class of the same family.

``create(name, config)`` equals ``DiffusersClass.from_config(config)`` (keys the class
does not accept are ignored, missing keys take that class's defaults);
``from_config(config)`` picks the class by the config's ``_class_name``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from .base import Scheduler, SchedulerConfig
from .ddim import DDIM
from .ddpm import DDPM
from .deis import DEIS
from .dpm_sde import DPMSolverSDE
from .dpm_singlestep import DPMSolverSinglestep
from .dpmpp_2s_ancestral import DPMPP2SAncestral
from .dpmsolver import DPMSolverMultistep
from .euler import Euler, EulerAncestral
from .heun import Heun
from .lcm import LCM
from .lms import LMS
from .pndm import PNDM
from .tcd import TCD
from .unipc import UniPC

_FACTORIES: dict[str, Callable[[Mapping[str, Any]], Scheduler]] = {
    "ddim": DDIM,
    "ddpm": DDPM,
    "pndm": PNDM,
    "lms": LMS,
    "euler": Euler,
    "euler_karras": lambda config: Euler(config, use_karras_sigmas=True),
    "euler_a": EulerAncestral,
    "heun": Heun,
    "dpmpp_2m": DPMSolverMultistep,
    "dpmpp_2m_karras": lambda config: DPMSolverMultistep(config, use_karras_sigmas=True),
    "dpmpp_2m_sde": lambda config: DPMSolverMultistep(config, algorithm_type="sde-dpmsolver++"),
    "dpmpp_2m_sde_karras": lambda config: DPMSolverMultistep(config, algorithm_type="sde-dpmsolver++",
                                                             use_karras_sigmas=True),
    "dpmpp_2s": DPMSolverSinglestep,
    "dpmpp_2s_karras": lambda config: DPMSolverSinglestep(config, use_karras_sigmas=True),
    "dpmpp_2s_a": DPMPP2SAncestral,
    "dpmpp_2s_a_karras": lambda config: DPMPP2SAncestral(config, use_karras_sigmas=True),
    "dpmpp_sde": DPMSolverSDE,
    "dpmpp_sde_karras": lambda config: DPMSolverSDE(config, use_karras_sigmas=True),
    "deis": DEIS,
    "unipc": UniPC,
    "lcm": LCM,
    "tcd": TCD,
}

NAMES: tuple[str, ...] = tuple(_FACTORIES)

# our name -> (the diffusers class it equals, extra from_config arguments); for tests,
# benchmarks and docs — the runtime never imports diffusers.
DIFFUSERS_EQUIVALENT: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}),
    "dpmpp_2s_karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}

# our name -> (the k-diffusion sampler it equals, Euler-schedule options): those with no diffusers
# class; their sigmas are EulerDiscreteScheduler's built with those options.
K_DIFFUSION_EQUIVALENT: dict[str, tuple[str, dict]] = {
    "dpmpp_2s_a": ("sample_dpmpp_2s_ancestral", {}),
    "dpmpp_2s_a_karras": ("sample_dpmpp_2s_ancestral", {"use_karras_sigmas": True}),
}

# diffusers class name -> our name (Euler's, DPM-Solver's and DPM SDE's karras and SDE flags are read from the config).
CLASS_NAMES: dict[str, str] = {cls: name for name, (cls, extra) in DIFFUSERS_EQUIVALENT.items() if not extra}


def create(name: str, config: Mapping[str, Any] | None = None) -> Scheduler:
    """Scheduler ``name`` built from a model folder's scheduler config (any class's)."""
    if name not in _FACTORIES:
        raise ValueError(f"scheduler: unknown name {name!r}; valid names: {', '.join(NAMES)}")
    return _FACTORIES[name](dict(config or {}))


def from_config(config: Mapping[str, Any]) -> Scheduler:
    """The scheduler the config was saved by (its ``_class_name``)."""
    class_name = config.get("_class_name")
    if class_name not in CLASS_NAMES:
        raise ValueError(
            f"scheduler config: unsupported _class_name {class_name!r}; supported: {', '.join(CLASS_NAMES)}"
        )
    # Euler's and DPM-Solver's names follow the config (karras sigmas, SDE variant): the instance says it
    return create(CLASS_NAMES[class_name], config)


__all__ = [
    "NAMES", "CLASS_NAMES", "DIFFUSERS_EQUIVALENT", "K_DIFFUSION_EQUIVALENT", "create", "from_config", "Scheduler",
    "SchedulerConfig", "DDIM", "DDPM", "PNDM", "LMS", "Euler", "EulerAncestral", "Heun", "DPMSolverMultistep", "UniPC",
    "LCM", "TCD", "DPMSolverSinglestep", "DEIS", "DPMSolverSDE", "DPMPP2SAncestral",
]
