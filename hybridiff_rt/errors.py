"""Exception types raised by hybridiff_rt.

Every error says what went wrong and what to change. All derive from :class:`HybridError` so a
caller can catch the family; each also derives from the closest builtin (``ValueError``,
``TimeoutError``, ...) so generic handlers keep working.
"""

from __future__ import annotations


class HybridError(RuntimeError):
    """Base class of every error hybridiff_rt raises on purpose."""


class ConfigError(HybridError, ValueError):
    """A HybridConfig or schedule parameter is invalid (the message names the field)."""


class WorldSizeError(HybridError, ValueError):
    """The number of ranks is not one this runtime supports."""


class RankMismatchError(HybridError):
    """Ranks disagree on config, prompt, seed or shapes; raised on every rank."""


class PeerTimeoutError(HybridError, TimeoutError):
    """A peer rank died or stopped answering within the configured timeout."""


class UnsupportedModelError(HybridError, TypeError):
    """The denoiser is not a model family hybridiff_rt can partition."""


class ShapeError(HybridError, ValueError):
    """Tensor shapes, dtypes or devices do not fit the operation."""


class NonFinitePredictionError(HybridError, FloatingPointError):
    """The denoiser produced NaN or infinite values."""


class ExtensionError(HybridError):
    """The compiled extension ``hybridiff_rt._C`` is missing or cannot serve the request."""


class CudaUnavailableError(ExtensionError):
    """No CUDA driver or no CUDA device is present, or CUDA was not compiled in."""
