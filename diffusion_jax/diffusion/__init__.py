"""The pure diffusion core: schedules, parameterizations, losses, grids, samplers, guidance,
training noise levels and EDM preconditioning.

Every function here is pure and jit-able; none reads a config.
"""

from diffusion_jax.diffusion import (
           grids,
           guidance,
           losses,
           noise_levels,
           parameterization,
           preconditioning,
           samplers,
           schedules,
)

__all__ = ["grids", "guidance", "losses", "noise_levels", "parameterization",
           "preconditioning", "samplers", "schedules"]
