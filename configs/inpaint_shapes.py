r"""An inpainting stage (Stable Diffusion's inpainting model, Rombach et al. 2022): the demo
base stage's U-Net with the masked image and the mask as 4 extra input channels, trained
on random rectangle masks (10% fully masked, so it is also a text-to-image model).

  python experiments/train.py --config=configs/inpaint_shapes.py --workdir=runs/inpaint
  python experiments/edit.py inpaint --method=stage --workdir=runs/inpaint \
      --image=in.png --mask=mask.png --prompt="a red circle" --outdir=runs/edit

`:smoke` shrinks it to two steps (tests). Unlike the training-free methods (known-region
replacement, RePaint), the stage sees the known pixels at every step.
"""

from configs import demo_base


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/inpaint_shapes.py takes no argument or ':smoke', got {arg!r}.")
  c = demo_base.get_config(arg)
  c.data.shapes_single_size = None  # measured (README) with either size; the demo's is large
  # Measured (README) with the uniform v-loss; demo_base's min-SNR-5 is untried here.
  c.diffusion.weighting = "uniform"
  c.conditioning.kind = "masked_image"
  c.conditioning.mask_min_fraction = 0.2
  c.conditioning.mask_max_fraction = 0.8
  c.conditioning.mask_full_prob = 0.1
  c.train.time_budget_s = None if arg == "smoke" else 600.0
  c.train.preview_every = 0  # a preview has no image to inpaint
  return c
