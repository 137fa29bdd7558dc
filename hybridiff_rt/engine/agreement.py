"""First-call agreement check: do all ranks run the same call, with the same inputs?

At the first denoiser call of every run, each rank digests named fields (every tensor and scalar
that reaches the denoiser, plus what the caller adds: the pipeline call's arguments, the scheduler),
publishes the digests in the torch.distributed store and reads everyone else's. Every rank
compares every digest, so a mismatch raises RankMismatchError on all ranks at the same call,
naming the first field that differs; a rank that never arrives raises PeerTimeoutError on the
others (bounded by the caller's timeout, normally ``HybridConfig.handshake_timeout_s``).

Digests are exact: a tensor's dtype, shape and every byte (SHA-256), so two ranks whose latents
differ in one element disagree. Ranks must therefore compute identical inputs; they do when they
run the same code, weights, dtype and device type with the same seeds.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ..comm import wait_for_keys
from ..errors import RankMismatchError

#: What to tell the user for each field name the runtime checks (fields "call.<name>" get
#: CALL_ADVICE).
ADVICE = {
    "config": "build the same HybridConfig on every rank",
    "guidance": "pass the same guidance_scale on every rank (one rank runs classifier-free "
                "guidance, the other does not)",
    "num_steps": "pass the same num_inference_steps (and strength / denoising_start / "
                 "denoising_end) on every rank",
    "guidance_scale": "pass the same guidance_scale on every rank",
    "shapes": "use the same height, width, batch size, num_images_per_prompt and dtype on every "
              "rank",
    "timestep": "use the same scheduler, its config and num_inference_steps on every rank",
    "sample": "give every rank the same initial latents: the same generator seeds (and, for "
              "image-to-image, the same init image and strength); pipelines that draw from "
              "torch's global random generator need torch.manual_seed(<same seed>) on every rank",
    "cond": "pass the same prompt (and conditioning inputs) on every rank; a pipeline that draws "
            "from torch's global random generator (e.g. SD3 ControlNet encoding its control "
            "image) also needs torch.manual_seed(<same seed>) on every rank",
    "uncond": "pass the same negative prompt (and conditioning inputs) on every rank",
    "inputs": "pass the same prompt and conditioning inputs on every rank",
    "model": "load the same checkpoint and dtype on every rank",
    "scheduler": "use the same scheduler class and scheduler config on every rank",
}
CALL_ADVICE = "pass the same value to the pipeline call on every rank"


def digest(value: Any) -> str:
    """An exact SHA-256 digest (hex, 32 characters) of a value: tensors by dtype, shape and bytes,
    containers element by element (dict keys sorted), anything else by its type and ``repr``."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()[:32]


def _feed(h: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            flat = torch.empty(t.numel(), dtype=t.dtype)  # dense, stride 1, on the host
            flat.copy_(t.reshape(-1))
            h.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=str):
            h.update(f"K{key!r}".encode())
            _feed(h, value[key])
    elif isinstance(value, (set, frozenset)):  # iteration order varies between processes
        h.update(f"S{len(value)}".encode())
        for item in sorted(value, key=repr):
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{type(value).__name__}{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, float):
        h.update(f"F{value.hex()}".encode())
    elif value is None or isinstance(value, (bool, int, str, bytes)):
        h.update(f"V{type(value).__name__}:{value!r}".encode())
    elif isinstance(value, torch.Generator):
        h.update(f"G{value.device}".encode())
        _feed(h, value.get_state())
    elif hasattr(value, "__array__") and not callable(value):  # numpy arrays, PIL images
        import numpy as np

        array = np.asarray(value)
        h.update(f"A{array.dtype}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    elif callable(value):  # callbacks: only which function (what it does per rank is the
        # caller's business)
        name = getattr(value, "__qualname__", type(value).__qualname__)
        h.update(f"C{getattr(value, '__module__', '')}.{name}".encode())
    else:
        text = repr(value)
        # a default repr holds a memory address that differs between processes
        h.update(f"O{type(value).__qualname__}:{'' if ' at 0x' in text else text}".encode())


def check_agreement(store, rank: int, world_size: int, key: str, fields: dict[str, Any],
                    timeout_s: float) -> None:
    """Publish this rank's digests under ``key`` and compare them with every other rank's.

    Args:
        fields: name -> value, in the order the fields should be reported (the first differing
            one is named first).

    Raises:
        PeerTimeoutError: some rank did not publish within ``timeout_s`` seconds.
        RankMismatchError: some field differs or is missing on some rank; the message names the
            fields and what to change.
    """
    mine = [[name, digest(value)] for name, value in fields.items()]
    store.set(f"{key}/{rank}", json.dumps(mine))
    keys = [f"{key}/{r}" for r in range(world_size)]
    wait_for_keys(store, keys, timeout_s,
                  f"rank {rank}/{world_size}: the first-call agreement check",
                  "The limit is HybridConfig(handshake_timeout_s=...).")
    everyone = [dict(json.loads(store.get(k))) for k in keys]
    names = list(fields) + [n for r in everyone for n in r if n not in fields]
    names = list(dict.fromkeys(names))
    differing = []
    for name in names:
        bad = [r for r in range(world_size) if everyone[r].get(name) != everyone[0].get(name)]
        if bad:
            advice = ADVICE.get(name, CALL_ADVICE if name.startswith("call.") else
                                "make it equal on every rank")
            differing.append(f"{name} (rank 0 vs rank{'s' if len(bad) > 1 else ''} "
                             f"{', '.join(map(str, bad))}): {advice}")
    if differing:
        raise RankMismatchError(f"rank {rank}: ranks disagree at the first denoiser call of the "
                                "run on " + "; ".join(differing))
