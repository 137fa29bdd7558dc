"""One SDXL image on two devices with hybridiff_rt, or the one-device reference of the same seed.

    torchrun --nproc_per_node=2 examples/sdxl.py --prompt "a lighthouse in a storm"
    python examples/sdxl.py --serial --prompt "a lighthouse in a storm"
    python examples/sdxl.py --compare out/sdxl-seed0-hybrid.png out/sdxl-seed0-serial.png

--model takes a hub id (default stabilityai/stable-diffusion-xl-base-1.0) or a local diffusers
folder. fp16 on CUDA, fp32 on CPU (--dtype to change). Rank 0 writes the image and its RunReport
(.json next to it). `--help` lists every option; the checks live in examples/common.py.
"""

from __future__ import annotations

import common
import hybridiff_rt as hr


def main(argv: list[str] | None = None):
    """Run the script; returns common.finish's dict (or the PSNR with --compare)."""
    run = common.prepare(common.SDXL, argv)
    if not isinstance(run, common.Run):
        return run  # --compare
    from diffusers import StableDiffusionXLPipeline

    a = run.args
    pipe = StableDiffusionXLPipeline.from_pretrained(a.model, **run.load_kwargs)
    common.check_denoiser(common.SDXL, pipe)
    pipe = hr.parallelize(pipe.to(run.device), run.cfg)
    pipe.set_progress_bar_config(disable=run.rank != 0)
    out, seconds = common.timed_call(
        pipe, prompt=a.prompt, negative_prompt=a.negative_prompt, num_inference_steps=a.steps,
        guidance_scale=a.guidance, height=a.height, width=a.width,
        generator=common.generator(a.seed))
    return common.finish(run, out.images[0], hr.last_report(pipe), seconds)


if __name__ == "__main__":
    main()
