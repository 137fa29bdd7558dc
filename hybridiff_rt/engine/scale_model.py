"""Modelled speed-up of a run on 2N ranks over one device, from measured unit costs.

Model (all times in ms, per denoiser call; costs are taken as linear in the number of images,
which holds for large models and overstates the gain for tiny ones):

* one device: both branches of all B images, ``2 * B * c`` with ``c`` the measured cost of one
  image through the whole model (sum of the unit costs of the profiled batch / its images);
* CBP step on 2N ranks: the largest share ``m = ceil(B / N)`` through the model, ``m * c``, plus
  the all-gather of the padded shares, ``(2N - 1) * m * p / link`` (``p`` prediction bytes per
  image, ``link`` bytes per ms);
* pipelined step: the partitioner's bottleneck stage (compute + outgoing boundary, measured unit
  costs and link), plus in "pairs" layout the all-gather of the pairs' predictions.

The run's figure weighs the two step kinds by how many of each the schedule runs.
"""

from __future__ import annotations

import math
from typing import Any


def modelled_speedup(*, images_per_branch: int, pairs: int, image_ms: float,
                     prediction_bytes_per_image: int, bytes_per_ms: float, cbp_steps: int,
                     pipelined_steps: int, pipeline_bottleneck_ms: float | None,
                     pipeline_gathers: bool) -> dict[str, Any]:
    """The model above as a JSON-ready dict: per-step times and speed-ups.

    Args:
        images_per_branch: B.
        pairs: N (world size 2N).
        image_ms: c, measured ms of one image through the whole model.
        prediction_bytes_per_image: p.
        bytes_per_ms: measured (or nominal) link figure.
        cbp_steps / pipelined_steps: step counts of the run's schedule.
        pipeline_bottleneck_ms: the plan's bottleneck (None when nothing is pipelined).
        pipeline_gathers: pipelined steps end with a world all-gather ("pairs" layout).
    """
    share = math.ceil(images_per_branch / pairs)
    gather_ms = (2 * pairs - 1) * share * prediction_bytes_per_image / bytes_per_ms
    one_device_ms = 2 * images_per_branch * image_ms
    cbp_ms = share * image_ms + gather_ms
    pipe_ms = None
    if pipelined_steps and pipeline_bottleneck_ms is not None:
        pipe_ms = pipeline_bottleneck_ms + (gather_ms if pipeline_gathers else 0.0)
    total = cbp_steps * cbp_ms + (pipelined_steps * pipe_ms if pipe_ms is not None else 0.0)
    steps = cbp_steps + (pipelined_steps if pipe_ms is not None else 0)
    return {
        "one_device_step_ms": one_device_ms,
        "cbp_step_ms": cbp_ms,
        "pipelined_step_ms": pipe_ms,
        "cbp_speedup": one_device_ms / cbp_ms if cbp_ms > 0 else math.inf,
        "pipelined_speedup": (one_device_ms / pipe_ms if pipe_ms else None),
        "run_speedup": steps * one_device_ms / total if total > 0 else math.inf,
        "assumes": "costs linear in the number of images; transfers not overlapped",
    }
