r"""CFG vs CLIP guidance vs classifier guidance, and combinations (GLIDE, Nichol et al. 2022,
sec. 3.3, found classifier-free guidance preferred to CLIP guidance; Dhariwal & Nichol 2021
guide with a noise-aware classifier): ShapesEval against FD-probe on the demo's base stage
(32 px, 800 training steps), trained once for every arm.

  python experiments/ablate.py --sweep=configs/sweeps/clip_guidance.py --root=runs/sweeps

Two frozen models, trained once before the arms on x_t at the base stage's noise levels:
the noise-aware CLIP (configs/clip_shapes.py:noisy) and the noise-aware attribute classifier
(configs/attribute_classifier_shapes.py). Arms: classifier-free guidance 1 (the conditional
model alone) or 3, each with CLIP guidance 0 (off), 5, 20 or 80, and each with classifier
guidance 1, 3 or 10 (CLIP guidance off).
"""

def get_config():
  c = {}
  c["name"] = "clip_guidance"
  c["stages"] = {"base": "configs/demo_base.py"}
  c["frozen"] = {"clip": {"kind": "clip", "config": "configs/clip_shapes.py:noisy"},
                 "classifier": {"kind": "classifier",
                                "config": "configs/attribute_classifier_shapes.py"}}
  # Objects of either size, as measured (the demo's are all large since).
  c["fixed"] = {"base.data.shapes_single_size": None,
                "base.train.time_budget_s": None, "base.train.num_steps": 800,
                "sample.sampler": "dpmpp_2m", "sample.steps": 25,
                "sample.clip_checkpoint": "@clip",
                "sample.classifier_checkpoint": "@classifier"}
  c["axes"] = {"sample.guidance_scale": [1.0, 3.0],
               "sample.clip_guidance_scale": [0.0, 5.0, 20.0, 80.0]}
  c["arms"] = [{"sample.guidance_scale": w, "sample.classifier_guidance_scale": s}
               for w in (1.0, 3.0) for s in (1.0, 3.0, 10.0)]
  # (colour_shape only: the classifier guides prompts of one colour x shape pair)
  c["evaluate"] = {"categories": ["colour_shape"], "images_per_prompt": 2, "fd_images": 96}
  c["report"] = {"metrics": ["colour_shape", "colour_shape/held_out", "fd_probe"],
                 "pareto": [("fd_probe", "colour_shape", "sample.clip_guidance_scale"),
                            ("fd_probe", "colour_shape", "sample.classifier_guidance_scale")]}
  return c
