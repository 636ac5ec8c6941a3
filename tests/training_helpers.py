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


def tiny_unet(resolution=16, super_resolution=False):
  return UNet(UNetConfig(
      levels=(Level(1, 1, False, False), Level(2, 1, True, True)), base_channels=16,
      num_heads=2, resolution=resolution, text_width=TEXT_DIM, text_length=TEXT_LEN,
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
  """Batches of one-object shapes scenes, in order, from example ``index`` on."""

  def __init__(self, batch_size, resolution=16, lowres_resolution=None, nan_images=False):
    self.batch_size, self.resolution = batch_size, resolution
    self.lowres_resolution, self.nan_images = lowres_resolution, nan_images
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self):
    images, lowres, captions = [], [], []
    for _ in range(self.batch_size):
      _, caption, image = shapes.make_example(0, "train", self.index, self.resolution,
                                              max_objects=1)
      self.index += 1
      images.append(image.astype(np.float32) / 127.5 - 1.0)
      captions.append(caption)
      if self.lowres_resolution:
        small = shapes.make_example(0, "train", self.index - 1, self.lowres_resolution,
                                    max_objects=1)[2]
        lowres.append(small.astype(np.float32) / 127.5 - 1.0)
    batch = {"image": np.stack(images), "caption": np.array(captions, dtype=object)}
    if self.nan_images:
      batch["image"][:] = np.nan
    if self.lowres_resolution:
      batch["lowres"] = np.stack(lowres)
    return batch

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def run(workdir, num_steps, *, batch_size=8, checkpoint_every=1000, log_every=1,
        mesh_axes=(("data", -1), ("model", 1)), learning_rate=2e-3, on_step_end=None,
        nan_images=False, max_nonfinite_in_a_row=20, grad_accum_steps=1, seed=0,
        super_resolution=False):
  resolution = 16
  lowres = resolution // 2 if super_resolution else None
  from diffusion_jax.diffusion import schedules
  diffusion = step_lib.DiffusionSettings(
      lowres_schedule=schedules.ShiftedCosineSchedule() if super_resolution else None,
      lowres_aug_max_t=0.5)
  return loop_lib.train(
      workdir, model=tiny_unet(resolution, super_resolution),
      loop=loop_lib.LoopSettings(
          num_steps=num_steps, batch_size=batch_size, resolution=resolution,
          lowres_resolution=lowres, log_every=log_every, checkpoint_every=checkpoint_every,
          mesh_axes=mesh_axes, max_nonfinite_in_a_row=max_nonfinite_in_a_row, seed=seed),
      step_settings=step_lib.StepSettings(diffusion, ema_decay=0.9,
                                          grad_accum_steps=grad_accum_steps),
      optimizer=state_lib.OptimizerSettings(learning_rate=learning_rate, warmup_steps=2),
      data_factory=lambda: ShapesIterator(batch_size, resolution, lowres, nan_images),
      text_encoder=HashText(), on_step_end=on_step_end, log=lambda s: None)
