"""examples/sdxl.py and examples/sd3.py on tiny checkpoints saved to a temporary folder.

Each script runs once as the one-device reference (--serial, in this process) and once on two CPU
ranks through real torchrun (a subprocess, as a user launches it), loading the checkpoint with
from_pretrained from the folder. The launch checks are tested for what they promise: a wrong
launch fails before any model work, with a message that says what to change.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridiff_rt.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
STEPS = 8
SIZE = 32
TORCHRUN_TIMEOUT_S = 240


def _import(name):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import importlib

    # a ``common`` module from elsewhere (bench/common.py) must not stand in for examples/common.py
    loaded = sys.modules.get("common")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").parent != EXAMPLES:
        del sys.modules["common"]
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny SDXL and SD3 pipelines (fresh random weights) saved as diffusers folders."""
    from hybridiff_rt import testing

    root = tmp_path_factory.mktemp("checkpoints")
    seed = random.randrange(1 << 16)
    folders = {}
    for family in ("sdxl", "sd3"):
        folders[family] = root / family
        testing.build(family, seed=seed).save_pretrained(folders[family])
    return folders


@pytest.fixture
def one_process(monkeypatch):
    """A plain `python` launch: no torchrun variables in the environment."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


def _common_args(folder, out, seed):
    return ["--model", str(folder), "--prompt", "a blue bird", "--negative-prompt", "grainy",
            "--seed", str(seed), "--steps", str(STEPS), "--height", str(SIZE), "--width",
            str(SIZE), "--device", "cpu", "--out", str(out)]


def _torchrun(script, args, cwd):
    """Run ``torchrun --nproc_per_node=2 examples/<script> args``; returns (rc, output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(EXAMPLES / script), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its two workers
        output, _ = proc.communicate()
        pytest.fail(f"torchrun {script} did not finish in {TORCHRUN_TIMEOUT_S} s:\n"
                    f"{output[-4000:]}")
    return proc.returncode, output


def _png_pixels(path):
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_serial_and_two_rank_runs_write_image_and_report(family, checkpoints, tmp_path,
                                                         one_process, capsys):
    script = _import(family)
    seed = random.randrange(1 << 16)
    # --- the one-device reference, in this process
    serial_png = tmp_path / "serial" / "ref.png"
    result = script.main(_common_args(checkpoints[family], serial_png, seed) + ["--serial"])
    assert result["image"] == serial_png and result["report"] == serial_png.with_suffix(".json")
    assert _png_pixels(serial_png).shape == (SIZE, SIZE, 3)
    serial = json.loads(serial_png.with_suffix(".json").read_text())
    assert serial["modes"] == ["serial"] * STEPS and serial["world_size"] == 1
    assert serial["run"]["seed"] == seed and serial["run"]["dtype"] == "float32"
    assert len(serial["step_ms"]) == STEPS and serial["total_ms"] > 0
    printed = capsys.readouterr().out
    assert str(serial_png) in printed and "no switching" in printed

    # --- two CPU ranks through torchrun: SDXL with its preset's pipelined step, SD3 with k=0
    hybrid_png = tmp_path / "hybrid" / "img.png"
    extra = ["--k", "0"] if family == "sd3" else []
    rc, output = _torchrun(f"{family}.py", _common_args(checkpoints[family], hybrid_png, seed)
                           + extra, cwd=tmp_path)
    assert rc == 0, output[-4000:]
    assert sorted(p.name for p in hybrid_png.parent.iterdir()) == ["img.json", "img.png"]
    hybrid = json.loads(hybrid_png.with_suffix(".json").read_text())
    assert hybrid["rank"] == 0 and hybrid["world_size"] == 2
    assert hybrid["transport"] == "torch-gloo" and hybrid["run"]["world_size"] == 2
    assert f"image:  {hybrid_png}" in output and f"tau1={hybrid['tau1']}" in output
    k = hybrid["config"]["k"]
    if family == "sd3":
        assert k == 0 and hybrid["modes"] == ["cbp"] * STEPS
    else:
        assert k >= 1 and hybrid["tau2"] == hybrid["tau1"] + k
        assert hybrid["modes"].count("pipeline") == k and hybrid["modes"][-1] == "cbp"
    assert _png_pixels(hybrid_png).shape == (SIZE, SIZE, 3)

    # --- --compare: condition-based partitioning only changes the batch size of each call
    value = script.main(["--compare", str(serial_png), str(hybrid_png)])
    assert f"{value:.2f} dB" in capsys.readouterr().out
    assert value > 0
    if family == "sd3":
        assert value > 40, f"k=0 two-rank image is {value:.1f} dB from the serial one"


def test_compare_prints_psnr_of_two_images(tmp_path, capsys):
    from PIL import Image

    common = _import("common")
    base = np.random.default_rng(random.randrange(1 << 16)).integers(0, 240, (8, 6, 3))
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    Image.fromarray(base.astype(np.uint8)).save(a)
    Image.fromarray((base + 10).astype(np.uint8)).save(b)  # every channel off by 10: MSE 100
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(c)
    value = _import("sd3").main(["--compare", str(a), str(b)])
    assert value == pytest.approx(10 * math.log10(255 ** 2 / 100), abs=1e-9)
    assert "28.13 dB" in capsys.readouterr().out
    assert common.psnr(a, a) == math.inf
    with pytest.raises(SystemExit, match="same size"):
        common.psnr(a, c)


def test_launch_checks_fail_before_any_model_work(checkpoints, tmp_path, one_process):
    sdxl, sd3, common = _import("sdxl"), _import("sd3"), _import("common")
    missing = str(tmp_path / "no-such-model")
    # one process without --serial: the world size is refused before the model is looked at
    with pytest.raises(SystemExit,
                       match=r"torchrun --nproc_per_node=2 examples/sdxl\.py.*--serial"):
        sdxl.main(["--model", missing, "--device", "cpu"])
    with pytest.raises(SystemExit, match="no such folder"):
        sdxl.main(["--model", missing, "--serial", "--device", "cpu"])
    # the other family's checkpoint, and a non-SDXL/SD3 one, are refused from model_index.json
    with pytest.raises(SystemExit,
                       match=r"StableDiffusion3Pipeline checkpoint.*Use examples/sd3\.py"):
        sdxl.main(["--model", str(checkpoints["sd3"]), "--serial", "--device", "cpu"])
    with pytest.raises(SystemExit,
                       match=r"StableDiffusionXLPipeline checkpoint.*Use examples/sdxl"):
        sd3.main(["--model", str(checkpoints["sdxl"]), "--serial", "--device", "cpu"])
    sd15 = tmp_path / "sd15"
    sd15.mkdir()
    (sd15 / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(SystemExit, match="StableDiffusionPipeline checkpoint.*not of the SDXL"):
        sdxl.main(["--model", str(sd15), "--serial", "--device", "cpu"])
    (sd15 / "model_index.json").unlink()
    with pytest.raises(SystemExit, match="no model_index.json"):
        sdxl.main(["--model", str(sd15), "--serial", "--device", "cpu"])
    # a schedule that cannot fit the steps
    with pytest.raises(SystemExit, match=r"tau_cap \+ k.*--k 9"):
        sdxl.main(["--model", str(checkpoints["sdxl"]), "--serial", "--device", "cpu",
                   "--steps", "10", "--k", "9"])
    # world-size rule for torchrun launches (pure function: no process group needed)
    common.check_world_size(common.SDXL, 2, serial=False)
    common.check_world_size(common.SDXL, 1, serial=True)
    with pytest.raises(SystemExit, match="plain python"):
        common.check_world_size(common.SDXL, 2, serial=True)
    common.check_world_size(common.SD3, 4, serial=False)  # two pairs of devices
    with pytest.raises(SystemExit, match="even number of ranks.*with 3 ranks"):
        common.check_world_size(common.SD3, 3, serial=False)
    with pytest.raises(SystemExit, match="even number of ranks.*without torchrun"):
        common.check_world_size(common.SD3, 1, serial=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_gpu_fails_with_advice(one_process):
    with pytest.raises(SystemExit, match="no usable CUDA GPU.*--device cpu"):
        _import("sdxl").main(["--device", "cuda", "--serial"])
