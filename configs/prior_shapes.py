r"""DALL-E 2's diffusion prior on the 1-object shapes: caption -> CLIP image embedding, with a
frozen CLIP (a train_clip workdir, or any Hugging Face CLIPModel directory).

  python -m experiments.train_clip --config=configs/clip_shapes.py --workdir=runs/clip_shapes
  python experiments/train_prior.py --config=configs/prior_shapes.py \
      --config.clip_dir=runs/clip_shapes --workdir=runs/prior_shapes

The workdir gets orbax checkpoints (rerunning the command resumes), ``prior.json`` (what
experiments/unclip.py loads: the network, caption length, schedule and CLIP) and
``eval.json`` (cosine of sampled to true image embeddings on validation images). `:smoke`
shrinks it to two steps. This config is not a U-Net config: configs/common.py's fields do
not apply.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/prior_shapes.py takes no argument or ':smoke', got {arg!r}.")
  c = ml_collections.ConfigDict()
  c.clip_dir = config_dict.placeholder(str)   # required: a train_clip workdir or CLIP dir
  c.resolution = 32               # the shapes are rendered at this size for the CLIP
  c.num_train = 10_000            # 1-object train examples, embedded once into memory
  c.num_eval = 256                # validation examples for eval.json
  c.batch_size = 128
  c.num_steps = 4000
  c.time_budget_s = config_dict.placeholder(float)   # stop early after this many seconds
  c.seed = 0
  c.log_every = 100
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  # The prior's transformer (embed_dim and text_width come from the CLIP).
  c.model = ml_collections.ConfigDict()
  c.model.hidden_size = 128
  c.model.num_hidden_layers = 4
  c.model.num_attention_heads = 4
  c.model.intermediate_size = 256
  # Diffusion on the embeddings: x0-prediction (DALL-E 2), classifier-free dropout.
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "cosine"
  c.diffusion.cond_drop_prob = 0.1
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.decay_steps = config_dict.placeholder(int)   # None: constant after warmup
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_grad_norm = 1.0
  c.ema_decay = 0.999
  # Validation sampling (eval.json).
  c.eval_steps = 25               # DDIM steps
  c.eval_guidance_scale = 3.0
  if arg == "smoke":
    c.num_train, c.num_eval, c.batch_size, c.num_steps = 64, 16, 8, 2
    c.log_every, c.checkpoint_every, c.eval_steps = 1, 1, 3
    c.model.hidden_size, c.model.num_hidden_layers = 32, 1
    c.model.num_attention_heads, c.model.intermediate_size = 2, 64
  return c.lock()
