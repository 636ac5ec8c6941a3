r"""Study 4: the text encoder (Imagen's ablation, section 4.4): the pretrained frozen
MiniLM against a random frozen t5-offline and a jointly trained t5-offline (GLIDE),
scored on the held-out colour x shape pairs and the binding category.

  python experiments/ablate.py --sweep=configs/sweeps/text_encoder.py --root=runs/sweeps

The base stage alone (a jointly trained encoder is sampled alone), 800 steps each (about
9 minutes here; a step budget, so the machine's load does not change what each arm learns), on
scenes of up to two objects so binding is learnable.
"""

def get_config():
  c = {}
  c["name"] = "text_encoder"
  c["stages"] = {"base": "configs/demo_base.py"}
  # Objects of either size, as measured (the demo's are all large since).
  c["fixed"] = {"base.data.shapes_single_size": None,
                "base.train.time_budget_s": None, "base.train.num_steps": 800,
                "base.data.shapes_max_objects": 2,
                "sample.guidance_scale": 3.0, "sample.sampler": "dpmpp_2m", "sample.steps": 25}
  c["arms"] = [{"base.text.encoder": "minilm-l6-offline"},
               {"base.text.encoder": "t5-offline"},
               {"base.text.encoder": "t5-offline", "base.text.trainable": True,
                "base.text.cache_dir": ""}]
  c["evaluate"] = {"categories": ["colour_shape", "binding"], "images_per_prompt": 2,
                   "fd_images": 0}
  c["report"] = {"metrics": ["colour_shape/held_out", "binding"]}
  return c
