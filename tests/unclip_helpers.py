"""Tiny CLIPs and priors for the unCLIP tests, saved as the experiments expect them."""

import functools
import pathlib

from diffusion_jax.models import clip as clip_lib
from diffusion_jax.training import clip_train

RESOLUTION = 8   # the tiny CLIP's image size; the tests render shapes at this size


@functools.cache
def _tokenizer():
  return clip_lib.train_tokenizer(clip_train.caption_vocabulary(300), 400)


def tiny_clip(seed: int = 0) -> clip_lib.CLIP:
  """A random CLIP (~20k parameters): 8 px images in 2 x 2 patches, 16-d embeddings."""
  tokenizer = _tokenizer()
  text = clip_lib.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, vocab_size=len(tokenizer),
                                 max_position_embeddings=16, eos_token_id=1, hidden_act="gelu")
  vision = clip_lib.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=RESOLUTION, patch_size=4,
                                     hidden_act="gelu")
  return clip_train.init_clip(clip_lib.CLIPConfig(text, vision, projection_dim=16), tokenizer,
                              seed)


def save_tiny_clip(directory) -> pathlib.Path:
  """A train_clip-like workdir holding ``clip/`` (a HF CLIPModel directory)."""
  directory = pathlib.Path(directory)
  clip_lib.save(tiny_clip(), directory / "clip")
  return directory
