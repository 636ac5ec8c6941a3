r"""The noise-aware attribute classifier of classifier guidance (Dhariwal & Nichol 2021):
colour, shape and position of single-pair shapes scenes, from x_t at the diffusion
schedule's noise levels (diffusion_jax.training.classifier_train).

  python experiments/train_classifier.py --config=configs/attribute_classifier_shapes.py \
      --workdir=runs/classifier_shapes
  python experiments/sample.py --workdirs=runs/demo_base --prompts="a red circle" \
      --classifier_guidance_scale=2 --classifier_checkpoint=runs/classifier_shapes/classifier \
      --outdir=runs/guided

The fields and defaults are ``classifier_train.ClassifierTrainSettings``'s (so this file and
the trainer cannot drift apart); ``schedule`` / ``schedule_kwargs`` should be the guided base
stage's (configs/demo_base.py's shifted cosine at 32 px) and ``resolution`` its resolution.
``:smoke`` trains a tiny one for a few steps (tests, laptops). This config is not a
diffusion config: configs/common.py's fields do not apply.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from diffusion_jax.training import classifier_train


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError("configs/attribute_classifier_shapes.py takes no argument or ':smoke', "
                     f"got {arg!r}.")
  fields = dataclasses.asdict(classifier_train.ClassifierTrainSettings())
  # A sub-dict, so one schedule argument can be overridden: --config.schedule_kwargs.resolution
  fields["schedule_kwargs"] = dict(fields["schedule_kwargs"])
  c = ml_collections.ConfigDict(fields)
  c.time_budget_s = config_dict.placeholder(float)   # stop early after this many seconds
  if arg == "smoke":
    c.resolution, c.width, c.levels = 8, 8, 2
    c.schedule_kwargs.resolution = c.schedule_kwargs.base_resolution = 8
    c.num_train, c.num_eval, c.batch_size, c.num_steps = 32, 16, 8, 3
    c.warmup_steps, c.log_every = 1, 1
  return c.lock()
