r"""Study 1: classifier-free guidance scale 0 ... 10 on the demo cascade, ShapesEval
against FD-probe (the Pareto curve of Imagen's guidance sweeps, its figure A.11).

  python experiments/ablate.py --sweep=configs/sweeps/guidance.py --root=runs/sweeps

One training run of each stage, then seven evaluations: guidance on the base stage only
(the super-resolution stage at 1, as the demo samples). The stages train for the steps the
demo's time budgets give on an idle machine here (1000 base, 300 super-resolution steps),
as step budgets, so the machine's load does not change what they learn.
"""

def get_config():
  c = {}
  c["name"] = "guidance"
  c["stages"] = {"base": "configs/demo_base.py", "sr": "configs/demo_sr.py"}
  # Run with the uniform v-loss, demo_base's weighting then (it is min-SNR-5 since).
  # Objects of either size, as measured (the demo's are all large since).
  c["fixed"] = {"base.data.shapes_single_size": None,
                "sr.data.shapes_single_size": None,
                "base.diffusion.weighting": "uniform",
                "base.train.time_budget_s": None, "base.train.num_steps": 1000,
                "sr.train.time_budget_s": None, "sr.train.num_steps": 300,
                "sample.sampler": "dpmpp_2m", "sample.steps": 25}
  c["axes"] = {"sample.guidance_scale": [[w, 1.0] for w in (0.0, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0)]}
  c["evaluate"] = {"categories": ["colour_shape"], "images_per_prompt": 2, "fd_images": 96}
  c["report"] = {"metrics": ["colour_shape", "colour_shape/held_out", "fd_probe"],
                 "pareto": [("fd_probe", "colour_shape", "sample.guidance_scale")]}
  return c
