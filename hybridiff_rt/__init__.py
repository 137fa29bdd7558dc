"""hybridiff_rt: hybrid data/pipeline-parallel classifier-free-guided diffusion on several devices.

Public API (README.md, docs/architecture.md)::

    import hybridiff_rt as hr
    hr.init_distributed()
    pipe = hr.parallelize(pipe, hr.HybridConfig.preset("sdxl"))
    out = pipe(prompt=..., num_inference_steps=50, guidance_scale=5.0)
    report = hr.last_report(pipe)
"""

from __future__ import annotations

from . import ops
from .comm.distributed import init_distributed
from .config import HybridConfig
from .pipeline_adapter import last_report, parallelize
from .engine import HybridDenoiser, RunReport
from .errors import (
    ConfigError,
    CudaUnavailableError,
    ExtensionError,
    HybridError,
    NonFinitePredictionError,
    PeerTimeoutError,
    RankMismatchError,
    ShapeError,
    UnsupportedModelError,
    WorldSizeError,
)
from .schedule import SwitchSchedule
from .stages import stage_denoiser

__version__ = "0.1.0"

__all__ = [
    "init_distributed",
    "HybridConfig",
    "parallelize",
    "last_report",
    "HybridDenoiser",
    "RunReport",
    "SwitchSchedule",
    "stage_denoiser",
    "ops",
    "ConfigError",
    "CudaUnavailableError",
    "ExtensionError",
    "HybridError",
    "NonFinitePredictionError",
    "PeerTimeoutError",
    "RankMismatchError",
    "ShapeError",
    "UnsupportedModelError",
    "WorldSizeError",
    "__version__",
]
