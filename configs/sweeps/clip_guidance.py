r"""CFG vs CLIP guidance vs both (GLIDE, Nichol et al. 2022, sec. 3.3 found classifier-free
guidance preferred; does it hold here?): ShapesEval against FD-probe on the demo's base
stage (32 px, 800 training steps).

  python experiments/ablate.py --sweep=configs/sweeps/clip_guidance.py --root=runs/sweeps

The noise-aware CLIP GLIDE guides with (configs/clip_shapes.py:noisy, trained on x_t at the
base stage's noise levels) is a frozen model of the sweep, trained once before the arms and
given to each as ``sample.clip_checkpoint``. Arms: classifier-free guidance 1 (the
conditional model alone) or 3, each with CLIP guidance 0 (off), 5, 20 and 80.
"""

def get_config():
  c = {}
  c["name"] = "clip_guidance"
  c["stages"] = {"base": "configs/demo_base.py"}
  c["frozen"] = {"clip": {"kind": "clip", "config": "configs/clip_shapes.py:noisy"}}
  c["fixed"] = {"base.train.time_budget_s": None, "base.train.num_steps": 800,
                "sample.sampler": "dpmpp_2m", "sample.steps": 25,
                "sample.clip_checkpoint": "@clip"}
  c["axes"] = {"sample.guidance_scale": [1.0, 3.0],
               "sample.clip_guidance_scale": [0.0, 5.0, 20.0, 80.0]}
  c["evaluate"] = {"categories": ["colour_shape"], "images_per_prompt": 2, "fd_images": 96}
  c["report"] = {"metrics": ["colour_shape", "colour_shape/held_out", "fd_probe"],
                 "pareto": [("fd_probe", "colour_shape", "sample.clip_guidance_scale")]}
  return c
