"""Small, fast stand-ins for the training tests: a tiny U-Net, a hashing text encoder and
an in-memory shapes iterator with get_state/set_state (the pipeline's protocol)."""

import hashlib

import numpy as np

from diffusion_jax.data import shapes
from diffusion_jax.models.unet import Level, UNet, UNetConfig
from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import step as step_lib

TEXT_LEN, TEXT_DIM = 8, 16


def tiny_unet(resolution=16, super_resolution=False, text_width=TEXT_DIM):
  return UNet(UNetConfig(
      levels=(Level(1, 1, False, False), Level(2, 1, True, True)), base_channels=16,
      num_heads=2, resolution=resolution, text_width=text_width, text_length=TEXT_LEN,
      super_resolution=super_resolution,
      lowres_resolution=resolution // 2 if super_resolution else None))


class HashText:
  """Deterministic word-hash embeddings [B, 8, 16] with an end token (valid mask >= 1)."""

  def encode(self, prompts):
    emb = np.zeros((len(prompts), TEXT_LEN, TEXT_DIM), np.float32)
    mask = np.zeros((len(prompts), TEXT_LEN), bool)
    for i, prompt in enumerate(prompts):
      words = prompt.split()[:TEXT_LEN - 1] + ["</s>"]
      for j, word in enumerate(words):
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
        emb[i, j] = np.random.RandomState(seed).randn(TEXT_DIM)
        mask[i, j] = True
    return emb, mask


class ShapesIterator:
  """Batches of one-object shapes scenes, in order, from example ``index`` on.

  Like the real pipeline, each process reads its own examples (every process_count-th
  from its process_index) and refuses a state saved by another process. Batches are
  NaN if ``nan_images``, or when their number (0-based, since the run started) is in
  ``nan_batches``.
  """

  def __init__(self, batch_size, resolution=16, lowres_resolution=None, nan_images=False,
               nan_batches=(), process_index=0, process_count=1):
    self.batch_size, self.resolution = batch_size // process_count, resolution
    self.lowres_resolution, self.nan_images = lowres_resolution, nan_images
    self.nan_batches, self.batches = set(nan_batches), 0
    self.process_index, self.process_count = process_index, process_count
    self.index = process_index

  def __iter__(self):
    return self

  def __next__(self):
    images, lowres, captions = [], [], []
    for _ in range(self.batch_size):
      _, caption, image = shapes.make_example(0, "train", self.index, self.resolution,
                                              max_objects=1)
      images.append(image.astype(np.float32) / 127.5 - 1.0)
      captions.append(caption)
      if self.lowres_resolution:
        small = shapes.make_example(0, "train", self.index, self.lowres_resolution,
                                    max_objects=1)[2]
        lowres.append(small.astype(np.float32) / 127.5 - 1.0)
      self.index += self.process_count
    batch = {"image": np.stack(images), "caption": np.array(captions, dtype=object)}
    if self.nan_images or self.batches in self.nan_batches:
      batch["image"][:] = np.nan
    self.batches += 1
    if self.lowres_resolution:
      batch["lowres"] = np.stack(lowres)
    return batch

  def get_state(self):
    return {"index": self.index, "process_index": self.process_index}

  def set_state(self, state):
    if state["process_index"] != self.process_index:
      raise ValueError(f"process {self.process_index} got the data state of process "
                       f"{state['process_index']}")
    self.index = int(state["index"])


def tiny_trainable_t5(trainable=True):
  """A one-layer offline T5 (width 32, max length TEXT_LEN) that compiles in seconds."""
  from diffusion_jax.models.t5 import T5Config
  from diffusion_jax.text import TextEncoder

  config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                    num_heads=2, feed_forward_proj="gated-gelu")
  return TextEncoder.offline(config=config, max_length=TEXT_LEN, trainable=trainable)


def run(workdir, num_steps, *, batch_size=8, checkpoint_every=1000, log_every=1,
        mesh_axes=(("data", -1), ("model", 1)), learning_rate=2e-3, on_step_end=None,
        nan_images=False, nan_batches=(), max_nonfinite_in_a_row=20, grad_accum_steps=1,
        seed=0, super_resolution=False, text_encoder=None, time_budget_s=None,
        log=lambda s: None, keep_checkpoints=3, allow_data_restart=False,
        recover_from_intact=False, config_json=None, resume_rules=None):
  import jax

  resolution = 16
  lowres = resolution // 2 if super_resolution else None
  from diffusion_jax.diffusion import schedules
  diffusion = step_lib.DiffusionSettings(
      lowres_schedule=schedules.ShiftedCosineSchedule() if super_resolution else None,
      lowres_aug_max_t=0.5)
  text_encoder = text_encoder or HashText()
  text_width = getattr(text_encoder, "width", TEXT_DIM)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  return loop_lib.train(
      workdir, model=tiny_unet(resolution, super_resolution, text_width),
      loop=loop_lib.LoopSettings(
          num_steps=num_steps, batch_size=batch_size, resolution=resolution,
          lowres_resolution=lowres, log_every=log_every, checkpoint_every=checkpoint_every,
          mesh_axes=mesh_axes, max_nonfinite_in_a_row=max_nonfinite_in_a_row, seed=seed,
          time_budget_s=time_budget_s, keep_checkpoints=keep_checkpoints,
          allow_data_restart=allow_data_restart, recover_from_intact=recover_from_intact),
      step_settings=step_lib.StepSettings(diffusion, ema_decay=0.9,
                                          grad_accum_steps=grad_accum_steps),
      optimizer=state_lib.OptimizerSettings(learning_rate=learning_rate, warmup_steps=2),
      data_factory=lambda: ShapesIterator(batch_size, resolution, lowres, nan_images,
                                          nan_batches, **process),
      text_encoder=text_encoder, on_step_end=on_step_end, log=log, config_json=config_json,
      resume_rules=resume_rules)
