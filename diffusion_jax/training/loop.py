"""The training loop every experiment (and every host of a TPU VM job) runs.

``train`` builds the mesh, initialises or restores the state directly onto its
shardings, compiles the train step once, and loops: next batch -> text embeddings ->
global arrays -> step -> metrics / checkpoints / previews. It resumes from the latest
checkpoint in ``workdir``, and on SIGTERM (TPU VM preemption) it writes a checkpoint of
the current step and returns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import cascade, images, sharding
from diffusion_jax.diffusion import grids
from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import metrics as metrics_lib
from diffusion_jax.training import state as state_lib
from diffusion_jax.training.step import StepSettings, train_step


class TextEncoderLike(Protocol):
  def encode(self, prompts: list[str]) -> tuple[Any, Any]:
    """-> (embeddings [B, L, D], mask [B, L] bool)."""


class DataIterator(Protocol):
  def __next__(self) -> dict: ...
  def get_state(self) -> Any: ...
  def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How long to train, what to log and when to save.

  ``num_steps`` is the step to stop at (a resumed run continues up to it);
  ``time_budget_s`` additionally stops after that much wall-clock time in this process.
  """

  num_steps: int
  batch_size: int
  resolution: int
  lowres_resolution: int | None = None
  time_budget_s: float | None = None
  seed: int = 0
  log_every: int = 50
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  max_nonfinite_in_a_row: int = 20
  mesh_axes: tuple[tuple[str, int], ...] = (("data", -1), ("model", 1))
  rules: sharding.LogicalRules = sharding.FSDP_RULES
  preview_every: int = 0
  preview_prompts: tuple[str, ...] = ()
  preview_steps: int = 25
  preview_guidance_scale: float = 3.0

  def __post_init__(self):
    for name in ("num_steps", "batch_size", "resolution", "log_every", "checkpoint_every",
                 "keep_checkpoints", "max_nonfinite_in_a_row"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.batch_size % jax.process_count():
      raise ValueError(f"batch_size {self.batch_size} must divide by the number of "
                       f"processes ({jax.process_count()}).")


class NonFiniteError(RuntimeError):
  pass


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no preemption saves
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def init_inputs(model_cfg, resolution: int, lowres_resolution: int | None,
                text_len: int, text_dim: int) -> dict:
  """Batch-1 dummy inputs for ``model.init``."""
  channels = model_cfg.in_channels
  inputs = dict(x_t=jnp.zeros((1, resolution, resolution, channels)),
                logsnr=jnp.zeros((1,)), text_emb=jnp.zeros((1, text_len, text_dim)),
                text_mask=jnp.ones((1, text_len), bool))
  if lowres_resolution is not None:
    inputs.update(lowres=jnp.zeros((1, lowres_resolution, lowres_resolution, channels)),
                  lowres_logsnr=jnp.zeros((1,)))
  return inputs


def state_spec(model: nn.Module, tx, inputs: dict, mesh, rules):
  """(init_state(key) -> boxed TrainState, its abstract shapes, its NamedShardings)."""
  def init_state(key):
    params = model.init(key, **inputs)["params"]  # boxed with logical axis names
    return state_lib.create_train_state(params, tx, key)

  abstract = jax.eval_shape(init_state, jax.random.key(0))
  return init_state, abstract, sharding.shardings_from_abstract(abstract, mesh, rules)


def restore_ema_params(workdir: str | pathlib.Path, *, model: nn.Module,
                       optimizer: state_lib.OptimizerSettings, loop: LoopSettings,
                       text_len: int, text_dim: int, step: int | None = None):
  """(EMA params of a training run's latest (or given) checkpoint, its step), placed on
  this process's mesh; the run's optimizer state is read abstractly and dropped."""
  mesh = sharding.make_mesh(dict(loop.mesh_axes))
  inputs = init_inputs(model.config, loop.resolution, loop.lowres_resolution, text_len,
                       text_dim)
  _, abstract, shardings = state_spec(model, state_lib.make_optimizer(optimizer), inputs,
                                      mesh, loop.rules)
  checkpointer = ckpt_lib.Checkpointer(workdir)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}: train this stage "
                              "first (experiments/train.py --workdir=...).")
    state, _ = checkpointer.restore(
        ckpt_lib.abstract_with_shardings(nn.unbox(abstract), shardings), step)
  finally:
    checkpointer.close()
  return state.ema_params, step


def encode_null(text_encoder: TextEncoderLike) -> dict:
  emb, mask = text_encoder.encode([""])
  return {"text_emb": jnp.asarray(emb[0]), "text_mask": jnp.asarray(mask[0])}


def _model_batch(batch: dict, text_encoder: TextEncoderLike) -> dict:
  """Host batch (images, captions) -> the arrays the train step takes."""
  emb, mask = text_encoder.encode([str(c) for c in batch["caption"]])
  out = {"image": np.asarray(batch["image"], np.float32),
         "text_emb": np.asarray(emb, np.float32), "text_mask": np.asarray(mask, bool)}
  if "lowres" in batch:
    out["lowres"] = np.asarray(batch["lowres"], np.float32)
  return out


def train(workdir: str | pathlib.Path, *, model: nn.Module, loop: LoopSettings,
          step_settings: StepSettings, optimizer: state_lib.OptimizerSettings,
          data_factory: Callable[[], Iterator[dict]], text_encoder: TextEncoderLike,
          config_json: dict | None = None, log: Callable[[str], None] = print,
          on_step_end: Callable[[int], None] | None = None):
  """Trains ``model`` in ``workdir`` (resuming if it holds checkpoints).

  ``on_step_end(step)`` is called after each step's bookkeeping (tests use it).

  Returns (final TrainState, last summarised metrics).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if config_json is not None and jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
  mesh = sharding.make_mesh(dict(loop.mesh_axes))
  tx = state_lib.make_optimizer(optimizer)
  null_cond = encode_null(text_encoder)
  text_len, text_dim = null_cond["text_emb"].shape
  inputs = init_inputs(model.config, loop.resolution, loop.lowres_resolution, text_len,
                       text_dim)

  init_state, abstract, state_shardings = state_spec(model, tx, inputs, mesh, loop.rules)
  base_key = jax.random.key(loop.seed)
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=loop.keep_checkpoints)
  data_state = None
  if checkpointer.latest_step() is not None:
    target = ckpt_lib.abstract_with_shardings(nn.unbox(abstract), state_shardings)
    state, data_state = checkpointer.restore(target)
    log(f"Resumed from {checkpointer.directory} at step {int(state.step)}.")
  else:
    state, _ = sharding.init_sharded(init_state, mesh, loop.rules, base_key)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  log(f"{num_params / 1e6:.2f}M parameters on mesh {dict(mesh.shape)}.")

  data = data_factory()
  if data_state is not None:
    data.set_state(data_state)
  null_cond = jax.device_put(null_cond, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, settings=step_settings,
                        learning_rate_fn=state_lib.learning_rate_schedule(optimizer)),
      out_shardings=(state_shardings, None), donate_argnums=0)
  preview = _make_preview(model, step_settings, loop, text_encoder, null_cond)

  writer = metrics_lib.MetricWriter(workdir, total_steps=loop.num_steps)
  accumulator = metrics_lib.MetricAccumulator()
  step = int(state.step)
  start_time = interval_start = time.time()
  interval_steps, summary = 0, {}
  with _Preemption() as preemption, sharding.sharding_context(mesh, loop.rules):
    try:
      while step < loop.num_steps:
        batch = sharding.host_local_to_global(_model_batch(next(data), text_encoder), mesh,
                                              loop.rules)
        state, metrics = step_fn(state, batch, null_cond)
        accumulator.add(metrics)
        step += 1
        interval_steps += 1
        out_of_time = (loop.time_budget_s is not None and
                       time.time() - start_time > loop.time_budget_s)
        last = step >= loop.num_steps or out_of_time or preemption.requested
        if step % loop.log_every == 0 or last:
          summary = accumulator.summarise()
          elapsed = time.time() - interval_start
          summary["images_per_s"] = interval_steps * loop.batch_size / max(elapsed, 1e-9)
          summary["skipped_total"] = float(state.nonfinite_total)
          writer.write(step, summary)
          writer.console(step, summary)
          interval_start, interval_steps = time.time(), 0
        if step % loop.log_every == 0 or step % loop.max_nonfinite_in_a_row == 0 or last:
          in_a_row = int(state.nonfinite_in_a_row)
          if in_a_row >= loop.max_nonfinite_in_a_row:
            raise NonFiniteError(
                f"{in_a_row} steps in a row had a NaN/Inf loss or gradient (at step {step});"
                " stopping. Lower the learning rate, enable gradient clipping, or check the "
                f"data. The last good checkpoint is in {checkpointer.directory}.")
        pause_start = time.time()  # checkpoints and previews don't count as step time
        if step % loop.checkpoint_every == 0 or last:
          checkpointer.save(step, state, data.get_state(), config_json)
        if preview is not None and (step % loop.preview_every == 0 or last):
          preview(state, step, writer, workdir)
        interval_start += time.time() - pause_start
        if on_step_end is not None:
          on_step_end(step)
        if out_of_time:
          log(f"Time budget of {loop.time_budget_s:.0f}s reached at step {step}.")
          break
        if preemption.requested:
          if checkpointer.latest_step() != step:  # the signal came after this step's save
            checkpointer.save(step, state, data.get_state(), config_json)
          log(f"SIGTERM: saved a checkpoint at step {step}; exiting.")
          break
    finally:
      checkpointer.wait()
      checkpointer.close()
      writer.close()
  return state, summary


def _make_preview(model, step_settings: StepSettings, loop: LoopSettings, text_encoder,
                  null_cond):
  """A jitted EMA sampler for the preview prompts (base stages), or None."""
  if not loop.preview_every or not loop.preview_prompts or loop.lowres_resolution:
    return None
  diffusion = step_settings.diffusion
  emb, mask = text_encoder.encode(list(loop.preview_prompts))
  grid = grids.uniform_time(diffusion.schedule, loop.preview_steps)
  image_shape = (loop.resolution, loop.resolution, model.config.out_channels)

  @jax.jit
  def sample(params, key):
    return cascade.sample_stage(
        model, params, jnp.asarray(emb), jnp.asarray(mask), null_cond, key, grid,
        image_shape=image_shape, parameterization=diffusion.parameterization,
        sampler="ddim", guidance_scale=loop.preview_guidance_scale)

  def preview(state, step, writer, workdir):
    out = sample(state.ema_params, jax.random.key(loop.seed))
    grid_image = images.make_grid(np.asarray(jax.device_get(out)),
                                  list(loop.preview_prompts), columns=4, scale=2)
    if jax.process_index() == 0:
      images.save_png(grid_image, pathlib.Path(workdir) / "previews" / f"step_{step}.png")
      writer.write_image(step, "preview", grid_image)

  return preview
