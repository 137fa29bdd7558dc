"""References and environments for tests of multi-rank runs (also usable in users' own tests).

* :func:`per_branch_forward`: make a denoiser run each CFG branch of a doubled batch as its own
  call: the exact serial reference for condition-based partitioning (in fp32 a two-rank run
  equals it bit for bit, while an ordinary batch-2 call differs by rounding).
* :func:`hidden_imports_env`: an environment for a subprocess in which some packages cannot be
  imported (as on a machine without them), everything else importing as usual.
"""

from __future__ import annotations

import inspect
import os
import textwrap
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..engine.batch import join_cfg_batch
from ..engine.branch_layout import (
    batch_axes,
    denoiser_sample_key,
    frames_per_row,
    split_branch_kwargs,
)
from ..stages.base import prediction_of


def per_branch_forward(model: torch.nn.Module) -> Callable[[], None]:
    """Patch ``model.forward`` so a CFG-doubled call ``[uncond; cond]`` runs each half as its own
    call; calls that are not a doubled batch (an odd batch, or skip-layer guidance's extra call
    with ``skip_layers=...``) run as given. Returns a function that removes the patch."""
    original = model.forward
    signature = inspect.signature(original)
    key = denoiser_sample_key(model)

    def forward(*args, **kwargs):
        kw = dict(signature.bind(*args, **kwargs).arguments)
        full = kw[key].shape[0]
        if kw.get("skip_layers") is not None or full % 2:
            return original(**kw)
        return_dict = kw.pop("return_dict", True)
        branches = split_branch_kwargs(kw, full, frames_per_row(model, kw[key]),
                                       batch_axes(model))
        outs = [prediction_of(original(**branch, return_dict=False)) for branch in branches]
        joined = join_cfg_batch(*outs)
        return (joined,) if not return_dict else type(original(**kw))(sample=joined)

    model.forward = forward
    return lambda: delattr(model, "forward")


_HIDE = textwrap.dedent('''
    import sys
    from importlib.machinery import PathFinder

    HIDDEN = set({hidden!r})

    class HidingPathFinder(PathFinder):
        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            if fullname.partition(".")[0] in HIDDEN:
                return None
            return super().find_spec(fullname, path, target)

    sys.meta_path[:] = [HidingPathFinder if f is PathFinder else f for f in sys.meta_path]
''')


def hidden_imports_env(folder: str | Path, packages: Iterable[str],
                       base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables for a subprocess in which ``packages`` (top-level names) cannot be
    imported: ``import x`` raises ModuleNotFoundError and ``importlib.util.find_spec`` returns
    None. Writes a ``sitecustomize.py`` into ``folder`` and puts it first on PYTHONPATH."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_HIDE.format(hidden=sorted(set(packages))))
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    return env
