r"""A small CLIP trained contrastively on the 1-object shapes dataset (~0.3 M parameters).

  python -m experiments.train_clip --config=configs/clip_shapes.py --workdir=runs/clip_shapes
  python -m experiments.train_clip --config=configs/clip_shapes.py:noisy \
      --workdir=runs/clip_shapes_noisy     # noise-aware, for CLIP guidance (GLIDE)

The workdir gets ``clip/`` (a Hugging Face CLIPModel directory: config.json,
model.safetensors, tokenizer, preprocessor_config.json) and ``eval.json`` (zero-shot
accuracy on validation and held-out-pair images). `:smoke` shrinks it to a few steps.
This config is not a diffusion config: configs/common.py's fields do not apply.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  if arg not in (None, "noisy", "smoke", "noisy_smoke"):
    raise ValueError("configs/clip_shapes.py takes no argument, ':noisy', ':smoke' or "
                     f"':noisy_smoke', got {arg!r}.")
  c = ml_collections.ConfigDict()
  c.resolution = 32
  c.num_train = 6000              # 1-object shapes train examples, rendered into memory
  c.num_eval = 480                # validation / held-out (test_compositional) images
  c.batch_size = 64
  c.num_steps = 1400
  c.time_budget_s = config_dict.placeholder(float)   # stop early after this many seconds
  c.learning_rate = 2e-3
  c.warmup_steps = 100
  c.weight_decay = 0.1
  c.seed = 0
  c.noise_aware = arg in ("noisy", "noisy_smoke")
  # Noise-aware only: the noise levels seen in training, those of the diffusion model to
  # guide (configs/demo_base.py's schedule).
  c.schedule = "shifted_cosine"
  c.schedule_kwargs = ml_collections.ConfigDict({"resolution": 32, "base_resolution": 32})
  c.log_every = 100
  if arg in ("smoke", "noisy_smoke"):
    c.num_train, c.num_eval, c.batch_size, c.num_steps = 64, 48, 16, 2
    c.time_budget_s = None
    c.log_every = 1
  return c.lock()
