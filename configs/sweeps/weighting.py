r"""Study 3: loss weighting, uniform vs min-SNR-5 vs EDM, score against training steps
(Hang et al. 2023 report 3.4x faster convergence with min-SNR-gamma).

  python experiments/ablate.py --sweep=configs/sweeps/weighting.py --root=runs/sweeps

Each weighting trains the demo's base stage for 1000 steps (about 11 minutes here),
checkpointing every 250 steps; the checkpoint axis evaluates the same run at several points
(one training run per weighting, shared by its checkpoints).
"""

def get_config():
  c = {}
  c["name"] = "weighting"
  c["stages"] = {"base": "configs/demo_base.py"}
  # Objects of either size, as measured (the demo's are all large since).
  c["fixed"] = {"base.data.shapes_single_size": None,
                "base.train.time_budget_s": None, "base.train.num_steps": 1000,
                "base.train.checkpoint_every": 250, "base.train.keep_checkpoints": 10,
                "sample.guidance_scale": 3.0, "sample.sampler": "dpmpp_2m", "sample.steps": 25}
  c["axes"] = {"base.diffusion.weighting": ["uniform", "min_snr", "edm"],
               "sample.checkpoint_steps": [250, 500, 750, 1000]}
  c["evaluate"] = {"categories": ["colour_shape"], "images_per_prompt": 2, "fd_images": 0}
  c["report"] = {"metrics": ["colour_shape", "colour_shape/held_out"]}
  return c
