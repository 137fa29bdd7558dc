"""Optional dependencies of the demo material, checked before any work starts.

The runtime needs only what ``pip install hybridiff_rt`` brings. The demo's plots need matplotlib,
training the bundled models needs scikit-learn (its digits data set); each comes with an extra of
the package. :func:`require` says, before anything is computed, exactly what to install.
"""

from __future__ import annotations

import importlib.util

from ..errors import HybridError

#: feature -> (the package extra that brings it, {import name: pip name})
FEATURES: dict[str, tuple[str, dict[str, str]]] = {
    "demo": ("demo", {"matplotlib": "matplotlib"}),
    "train": ("train", {"sklearn": "scikit-learn"}),
}


class MissingDependencyError(HybridError, ImportError):
    """An optional feature was asked for without the packages it needs."""


def missing(feature: str) -> list[str]:
    """pip names of the packages ``feature`` needs that cannot be imported here."""
    _, modules = FEATURES[feature]
    return [pip for module, pip in modules.items() if importlib.util.find_spec(module) is None]


def require(feature: str, what: str) -> None:
    """Raise MissingDependencyError naming the exact install command when ``feature``'s packages
    are missing; ``what`` names the command or function that needs them."""
    lacking = missing(feature)
    if lacking:
        extra, _ = FEATURES[feature]
        raise MissingDependencyError(
            f"{what} needs {', '.join(lacking)}, which is not installed. Install it with:\n"
            f"    pip install 'hybridiff_rt[{extra}]'\n"
            f"(or: pip install {' '.join(lacking)})")
