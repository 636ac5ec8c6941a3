r"""Study 2: sampler x steps on the demo's base stage (32 px, 800 training steps): how few
network evaluations each sampler needs to stay within 5% of the 250-step DDIM score.

  python experiments/ablate.py --sweep=configs/sweeps/samplers.py --root=runs/sweeps

The base stage alone (no super-resolution), so the study measures the sampler and not
the cascade; Heun makes two network evaluations per step. The four cheap step counts for
every sampler, plus the 250-step DDIM reference (250-step runs of the other samplers would
cost more than the rest of the sweep together). Every arm samples from the same seeds, so
arms are compared on the same initial noise.
"""

def get_config():
  c = {}
  c["name"] = "samplers"
  c["stages"] = {"base": "configs/demo_base.py"}
  # Run with the uniform v-loss, demo_base's weighting then (it is min-SNR-5 since).
  # Objects of either size, as measured (the demo's are all large since).
  c["fixed"] = {"base.data.shapes_single_size": None,
                "base.diffusion.weighting": "uniform",
                "base.train.time_budget_s": None, "base.train.num_steps": 800,
                "sample.guidance_scale": 3.0}
  c["axes"] = {"sample.sampler": ["ddpm", "ddim", "dpmpp_2m", "euler", "heun"],
               "sample.steps": [5, 10, 25, 50]}
  c["arms"] = [{"sample.sampler": "ddim", "sample.steps": 250}]
  c["evaluate"] = {"categories": ["colour_shape"], "images_per_prompt": 2, "fd_images": 0}
  c["report"] = {"metrics": ["colour_shape"],
                 "within": [{"metric": "colour_shape", "group": "sample.sampler",
                             "cost": "sample.steps", "tolerance": 0.05,
                             "reference": {"sample.sampler": "ddim", "sample.steps": 250}}]}
  return c
