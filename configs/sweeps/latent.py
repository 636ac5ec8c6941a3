r"""Latent vs pixel diffusion at 64 px on equal compute (Rombach et al. 2022's claim: the
same model trains and samples much faster in a good autoencoder's latent space).

  python experiments/ablate.py --sweep=configs/sweeps/latent.py --root=runs/sweeps

The f = 4 autoencoder of configs/autoencoder_shapes.py (1500 steps) is a frozen model of
the sweep, trained once before the arms. Both arms get 34.3 TFLOP of model FLOPs (as the
cascade study): the demo base U-Net on its 16x16x4 latents (configs/latent_shapes.py;
the frozen encoder's FLOPs are not counted, its time is: the table states minutes too)
against the same U-Net on 64 px pixels. Both are scored at 64 px.
"""

def get_config():
  c = {}
  c["name"] = "latent"
  c["stages"] = {"latent": "configs/latent_shapes.py", "pixel": "configs/demo_base.py"}
  c["stage_sets"] = {"latent": ["latent"], "pixel": ["pixel"]}
  c["frozen"] = {"ae": {"kind": "autoencoder", "config": "configs/autoencoder_shapes.py"}}
  c["equal_compute"] = {"latent": 34.3, "pixel": 34.3}  # TFLOP per training run
  # Objects of either size, as measured (the demo's are all large since).
  c["fixed"] = {"pixel.data.shapes_single_size": None,
                "latent.autoencoder.directory": "@ae",
                "pixel.data.resolution": 64,
                "pixel.diffusion.schedule_kwargs.shifted_cosine.resolution": 64,
                "sample.sampler": "dpmpp_2m", "sample.steps": 25, "sample.guidance_scale": 3.0}
  c["arms"] = [{"stages": "latent"}, {"stages": "pixel"}]
  c["evaluate"] = {"categories": ["colour_shape"], "images_per_prompt": 2, "fd_images": 96}
  c["report"] = {"metrics": ["colour_shape", "colour_shape/held_out", "fd_probe"]}
  return c
