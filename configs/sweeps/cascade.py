r"""Study 5: cascade vs single stage at 64 px on equal compute (Imagen's and CDM's claim
that a cascade of a small base and a super-resolution stage beats one stage at the
output resolution for the same training compute).

  python experiments/ablate.py --sweep=configs/sweeps/cascade.py --root=runs/sweeps

Both arms get the same training compute, 34.3 TFLOP of model FLOPs (``equal_compute``:
each stage's steps from its train step's FLOPs, experiments/train_flops.py): the demo
cascade (23.0 TFLOP at 38.1 GFLOP per step: 602 base steps at 32 px, about 7 minutes here;
11.3 TFLOP at 42.7 GFLOP: 264 steps of 32 -> 64 px super-resolution on crops, about 3
minutes) against the demo base U-Net trained at 64 px (its resolution-shifted cosine schedule
at 64; 159.3 GFLOP per step: 215 steps). Both are scored at 64 px; the table states each
arm's TFLOP and minutes.
"""

def get_config():
  c = {}
  c["name"] = "cascade"
  c["stages"] = {"base": "configs/demo_base.py", "sr": "configs/demo_sr.py",
                 "base64": "configs/demo_base.py"}
  c["stage_sets"] = {"cascade": ["base", "sr"], "single": ["base64"]}
  c["equal_compute"] = {"base": 23.0, "sr": 11.3, "base64": 34.3}  # TFLOP per training run
  # Run with the uniform v-loss, demo_base's weighting then (it is min-SNR-5 since).
  # Objects of either size, as measured (the demo's are all large since).
  c["fixed"] = {"base.data.shapes_single_size": None,
                "sr.data.shapes_single_size": None,
                "base64.data.shapes_single_size": None,
                "base.diffusion.weighting": "uniform",
                "base64.diffusion.weighting": "uniform",
                "base64.data.resolution": 64,
                "base64.diffusion.schedule_kwargs.shifted_cosine.resolution": 64,
                "sample.sampler": "dpmpp_2m", "sample.steps": 25}
  c["arms"] = [{"stages": "cascade", "sample.guidance_scale": [3.0, 1.0]},
               {"stages": "single", "sample.guidance_scale": 3.0}]
  c["evaluate"] = {"categories": ["colour_shape"], "images_per_prompt": 2, "fd_images": 96}
  c["report"] = {"metrics": ["colour_shape", "colour_shape/held_out", "fd_probe"]}
  return c
