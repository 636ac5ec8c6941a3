"""Config -> the InstructPix2Pix stage's data (configs/instruct_shapes.py): the shapes_edits
TFDS set of exact edit pairs (diffusion_jax/data/edit_pairs_tfds.py), prepared on first use
like the shapes set (builders.dataset_name)."""

from __future__ import annotations

import ml_collections
from cli import UserError

from diffusion_jax import conditioning
from diffusion_jax.data import edit_pairs_tfds

DATASET = edit_pairs_tfds.NAME


def dataset_name(config: ml_collections.ConfigDict) -> str:
  """'shapes_edits/<config>' for config.data (resolution, shapes_num_train), prepared into
  config.data.data_dir first if missing and config.data.prepare."""
  from diffusion_jax.data import multihost

  d = config.data
  render = d.shapes_resolution or d.resolution
  builder = edit_pairs_tfds.builder(d.data_dir, render, d.shapes_num_train)
  name = f"{DATASET}/{builder.builder_config.name}"
  if d.prepare:  # every process calls this; process 0 prepares (see builders.dataset_name)
    multihost.prepare_once(
        lambda: edit_pairs_tfds.prepare(d.data_dir, render, d.shapes_num_train, log=print),
        key=f"{name}@{d.data_dir}")
  elif not builder.is_prepared():
    raise UserError(f"Dataset {name} is not prepared in {d.data_dir}; run "
                    f"{edit_pairs_tfds.prepare_command(d.data_dir, name.split('/', 1)[1])} "
                    "or set config.data.prepare=True.")
  return name


def paired_image_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The dataset's image features an input_image stage also reads, cropped as the image
  (``pipeline.InputPipeline(paired_image_keys=...)``): its conditions' batch keys."""
  import conditioning_builders

  return tuple(c.batch_key for c in conditioning_builders.conditions(config)
               if isinstance(c, conditioning.InputImage))
