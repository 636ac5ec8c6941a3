r"""Study 2: sampler x steps on the demo's base stage (32 px): how few network
evaluations each sampler needs to stay within 5% of the 250-step DDIM score.

  python experiments/ablate.py --sweep=configs/sweeps/samplers.py --root=runs/sweeps

The base stage alone (no super-resolution), so the study measures the sampler and not
the cascade; Heun makes two network evaluations per step.
"""

def get_config():
  c = {}
  c["name"] = "samplers"
  c["stages"] = {"base": "configs/demo_base.py"}
  c["fixed"] = {"base.train.time_budget_s": 900.0, "sample.guidance_scale": 3.0}
  c["axes"] = {"sample.sampler": ["ddpm", "ddim", "dpmpp_2m", "euler", "heun"],
               "sample.steps": [5, 10, 25, 50, 250]}
  c["evaluate"] = {"categories": ["colour_shape"], "images_per_prompt": 1, "fd_images": 0}
  c["report"] = {"metrics": ["colour_shape"]}
  return c
