r"""Imagen's 64 px base model at paper scale (Saharia et al. 2022, appendix F): ~2B-param
U-Net, T5-XXL text (128 tokens), batch 2048, Adam 1e-4 with 10k warmup steps,
classifier-free guidance dropout 10%, v-prediction... on a TPU pod slice.

  # every host of the TPU VM slice:
  python experiments/train.py --config=configs/imagen_base64.py --workdir=gs://.../base64 \
      --config.text.encoder=/path/to/t5-v1_1-xxl --config.data.dataset=<your tfds dataset>

Only shape-checked on CPU (tests/test_configs.py evaluates its train state abstractly).
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.get_config()
  c.model.preset = "imagen_base64"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.diffusion.schedule_kwargs.shifted_cosine.resolution = 64
  c.diffusion.schedule_kwargs.shifted_cosine.base_resolution = 64
  c.data.resolution = 64
  c.data.dataset = "laion_like_text_image_dataset"   # replace with your TFDS dataset
  c.data.data_dir = "~/tensorflow_datasets"
  c.text.encoder = "google/t5-v1_1-xxl"
  c.text.max_length = 128
  c.text.cache_dir = "text_cache"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 10_000
  c.optimizer.decay_steps = 2_500_000
  c.train.batch_size = 2048
  c.train.num_steps = 2_500_000
  c.train.ema_decay = 0.9999
  c.train.checkpoint_every = 5000
  c.train.preview_every = 5000
  return c
