r"""Study 5: cascade vs single stage at 64 px on equal compute (Imagen's and CDM's claim
that a cascade of a small base and a super-resolution stage beats one stage at the
output resolution for the same training compute).

  python experiments/ablate.py --sweep=configs/sweeps/cascade.py --root=runs/sweeps

Both arms train for 10 minutes in all: the demo cascade (7 minutes at 32 px, 3 minutes of
32 -> 64 px super-resolution on crops) against the demo base U-Net trained at 64 px for
10 minutes (its resolution-shifted cosine schedule at 64). Both are scored at 64 px.
"""

def get_config():
  c = {}
  c["name"] = "cascade"
  c["stages"] = {"base": "configs/demo_base.py", "sr": "configs/demo_sr.py",
                 "base64": "configs/demo_base.py"}
  c["stage_sets"] = {"cascade": ["base", "sr"], "single": ["base64"]}
  c["fixed"] = {"base.train.time_budget_s": 420.0, "sr.train.time_budget_s": 180.0,
                "base64.train.time_budget_s": 600.0, "base64.data.resolution": 64,
                "base64.diffusion.schedule_kwargs.shifted_cosine.resolution": 64,
                "sample.sampler": "dpmpp_2m", "sample.steps": 25}
  c["arms"] = [{"stages": "cascade", "sample.guidance_scale": [3.0, 1.0]},
               {"stages": "single", "sample.guidance_scale": 3.0}]
  c["evaluate"] = {"categories": ["colour_shape"], "images_per_prompt": 2, "fd_images": 96}
  c["report"] = {"metrics": ["colour_shape", "colour_shape/held_out", "fd_probe"]}
  return c
