"""First-step agreement check: do all ranks run the same config, prompt, seed and shapes?

Each rank summarises named fields (tensors and plain values), publishes the summary in the
torch.distributed store and reads everyone else's. Every rank compares every summary, so a
mismatch raises RankMismatchError on all ranks at the same step, and a rank that never arrives
raises PeerTimeoutError on the others.

Tensors are compared by a small summary, not bit for bit, so two different GPU models (whose text
encoders round differently) still agree: element count, root mean square and four fixed
projections normalised by the tensor's norm, equal within ``REL_TOLERANCE``. Different prompts or
seeds change these by order one.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

from ..comm import wait_for_keys
from ..errors import RankMismatchError
from .batch import tensors_in

#: Relative tolerance on tensor summaries (numerics of different GPUs differ by ~1e-3).
REL_TOLERANCE = 1e-2
_PROJECTIONS = (0.6180339887, 1.4142135623, 2.7182818284, 3.1415926535)

#: What to tell the user for each field name the runtime checks.
ADVICE = {
    "config": "build the same HybridConfig on every rank",
    "num_steps": "pass the same num_inference_steps on every rank",
    "guidance_scale": "pass the same guidance_scale on every rank",
    "shapes": "use the same height, width, batch size, num_images_per_prompt and dtype on every "
              "rank",
    "timestep": "use the same scheduler and timesteps on every rank",
    "sample": "seed every rank the same way (same generator seed) so the initial latents match",
    "cond": "pass the same prompt (and conditioning inputs) on every rank",
    "uncond": "pass the same negative prompt on every rank",
    "model": "load the same checkpoint and dtype on every rank",
}


def summarize(value: Any) -> list[Any]:
    """A JSON-able summary of a field: tensor statistics, or a hash of a plain value."""
    tensors = tensors_in(value)
    if not tensors:
        return ["h", hashlib.sha256(repr(value).encode()).hexdigest()[:16]]
    out: list[Any] = ["t"]
    for tensor in tensors:
        flat = tensor.detach().reshape(-1).to(torch.float64)
        norm = float(flat.norm()) if flat.numel() else 0.0
        rms = norm / math.sqrt(max(flat.numel(), 1))
        index = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64)
        projections = [float((flat * torch.cos(index * c)).sum()) / norm if norm > 0 else 0.0
                       for c in _PROJECTIONS]
        out.append([flat.numel(), rms, *projections])
    return out


def summaries_agree(a: list[Any], b: list[Any]) -> bool:
    """True when two summaries describe the same field up to REL_TOLERANCE."""
    if a[0] != b[0] or len(a) != len(b):
        return False
    if a[0] == "h":
        return a[1] == b[1]
    for ta, tb in zip(a[1:], b[1:]):
        if ta[0] != tb[0]:
            return False
        scale = max(abs(ta[1]), abs(tb[1]), 1e-12)
        if abs(ta[1] - tb[1]) > REL_TOLERANCE * scale:
            return False
        if any(abs(x - y) > REL_TOLERANCE * max(1.0, abs(x)) for x, y in zip(ta[2:], tb[2:])):
            return False
    return True


def check_agreement(store, rank: int, world_size: int, key: str, fields: dict[str, Any],
                    timeout_s: float) -> None:
    """Publish this rank's summaries under ``key`` and compare them with every other rank's.

    Raises:
        PeerTimeoutError: some rank did not publish within ``timeout_s`` seconds.
        RankMismatchError: some field differs; the message names each field and what to change.
    """
    mine = {name: summarize(value) for name, value in fields.items()}
    store.set(f"{key}/{rank}", json.dumps(mine))
    keys = [f"{key}/{r}" for r in range(world_size)]
    wait_for_keys(store, keys, timeout_s,
                  f"rank {rank}/{world_size}: the first-step agreement check",
                  "The limit is HybridConfig(handshake_timeout_s=...).")
    everyone = [json.loads(store.get(k)) for k in keys]
    differing = []
    for name in fields:
        bad = [r for r in range(world_size)
               if name not in everyone[r] or not summaries_agree(everyone[0][name], everyone[r][name])]
        if bad:
            differing.append(f"{name} (rank 0 vs rank{'s' if len(bad) > 1 else ''} "
                             f"{', '.join(map(str, bad))}): {ADVICE.get(name, 'make it equal')}")
    if differing:
        raise RankMismatchError(f"rank {rank}: ranks disagree at the first step of the run on "
                                + "; ".join(differing))
