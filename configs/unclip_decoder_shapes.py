r"""unCLIP's decoder (DALL-E 2, Ramesh et al. 2022, sec. 2.1): configs/demo_base.py's 32 px
U-Net conditioned on the frozen CLIP's image embedding of each training image (projected
into the pooled conditioning and into extra context tokens), the caption optional.

  python -m experiments.train_clip --config=configs/clip_shapes.py --workdir=runs/clip_shapes
  python experiments/train.py --config=configs/unclip_decoder_shapes.py \
      --config.conditioning.clip_dir=runs/clip_shapes --workdir=runs/unclip/decoder

Then the existing demo super-resolution stage (configs/demo_sr.py, runs/demo/sr) takes it to
64 px: experiments/unclip.py sample / variations / evaluate --workdirs=<decoder>,<sr>.
As DALL-E 2 trains its decoder, the caption is dropped 50% of the time and the embedding
10% (independently), so the decoder also works from an embedding alone (variations) and
classifier-free guidance can drop both. `:smoke` shrinks it to two steps.
"""

from configs import demo_base


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/unclip_decoder_shapes.py takes no argument or ':smoke', got "
                     f"{arg!r}.")
  c = demo_base.get_config(arg)
  c.data.shapes_single_size = None  # measured (README) with either size; the demo's is large
  # Measured (README) with the uniform v-loss; demo_base's min-SNR-5 is untried here.
  c.diffusion.weighting = "uniform"
  c.conditioning.kind = "image_embed"
  c.conditioning.drop_prob = 0.1      # the CLIP image embedding
  c.diffusion.cond_drop_prob = 0.5    # the caption
  # clip_dir is required (a train_clip workdir or a HF CLIPModel directory); embed_dim is
  # then read from its config.json.
  return c
