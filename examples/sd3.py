"""One SD3 image on two devices with hybridiff_rt, or the one-device reference of the same seed.

    torchrun --nproc_per_node=2 examples/sd3.py --prompt "a lighthouse in a storm"
    python examples/sd3.py --serial --prompt "a lighthouse in a storm"
    python examples/sd3.py --compare out/sd3-seed0-hybrid.png out/sd3-seed0-serial.png

--model takes a hub id (default stabilityai/stable-diffusion-3-medium-diffusers) or a local
diffusers folder. fp16 on CUDA, fp32 on CPU (--dtype to change). Rank 0 writes the image and its
RunReport (.json next to it). `--help` lists every option; the checks live in examples/common.py.
"""

from __future__ import annotations

import common
import hybridiff_rt as hr


def main(argv: list[str] | None = None):
    """Run the script; returns common.finish's dict (or the PSNR with --compare)."""
    run = common.prepare(common.SD3, argv)
    if not isinstance(run, common.Run):
        return run  # --compare
    from diffusers import StableDiffusion3Pipeline

    a = run.args
    pipe = StableDiffusion3Pipeline.from_pretrained(a.model, **run.load_kwargs)
    common.check_denoiser(common.SD3, pipe)
    pipe = hr.parallelize(pipe.to(run.device), run.cfg)
    pipe.set_progress_bar_config(disable=run.rank != 0)
    out, seconds = common.timed_call(
        pipe, prompt=a.prompt, negative_prompt=a.negative_prompt, num_inference_steps=a.steps,
        guidance_scale=a.guidance, height=a.height, width=a.width,
        generator=common.generator(a.seed))
    return common.finish(run, out.images[0], hr.last_report(pipe), seconds)


if __name__ == "__main__":
    main()
