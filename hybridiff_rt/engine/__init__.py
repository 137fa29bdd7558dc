"""The per-rank step executor: HybridDenoiser, its RunReport and pure batch helpers."""

from .report import RunReport
from .runtime import HybridDenoiser, model_family

__all__ = ["HybridDenoiser", "RunReport", "model_family"]
