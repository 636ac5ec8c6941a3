r"""CFG vs classifier guidance vs both (Dhariwal & Nichol 2021 guide an unconditional or a
conditional model with a noise-aware classifier; Ho & Salimans 2021 drop the classifier):
ShapesEval against FD-probe on the demo's base stage (32 px, 800 training steps).

  python experiments/ablate.py --sweep=configs/sweeps/classifier_guidance.py --root=runs/sweeps

The noise-aware attribute classifier (configs/attribute_classifier_shapes.py, trained on x_t
at the base stage's noise levels) is a frozen model of the sweep, trained once before the
arms and given to each as ``sample.classifier_checkpoint``. Arms: classifier-free guidance
1 (the conditional model alone) or 3, each with classifier guidance 0 (off), 1, 3 and 10.
Declared, not yet run (it is not in the Makefile's SWEEPS).
"""

def get_config():
  c = {}
  c["name"] = "classifier_guidance"
  c["stages"] = {"base": "configs/demo_base.py"}
  c["frozen"] = {"classifier": {"kind": "classifier",
                                "config": "configs/attribute_classifier_shapes.py"}}
  c["fixed"] = {"base.train.time_budget_s": None, "base.train.num_steps": 800,
                "sample.sampler": "dpmpp_2m", "sample.steps": 25,
                "sample.classifier_checkpoint": "@classifier"}
  c["axes"] = {"sample.guidance_scale": [1.0, 3.0],
               "sample.classifier_guidance_scale": [0.0, 1.0, 3.0, 10.0]}
  # (colour_shape only: the classifier guides prompts of one colour x shape pair)
  c["evaluate"] = {"categories": ["colour_shape"], "images_per_prompt": 2, "fd_images": 96}
  c["report"] = {"metrics": ["colour_shape", "colour_shape/held_out", "fd_probe"],
                 "pareto": [("fd_probe", "colour_shape", "sample.classifier_guidance_scale")]}
  return c
