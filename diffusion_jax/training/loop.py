"""The training loop every experiment (and every host of a TPU VM job) runs.

``train`` builds the mesh, initialises or restores the state directly onto its
shardings, compiles the train step once, and loops: next batch -> text embeddings (or
tokens, for a text encoder that trains with the U-Net) -> global arrays -> step ->
metrics / checkpoints / previews. It holds ``workdir``'s lock for the whole run (one run
per workdir, see ``workdir_lock``) and resumes from the latest checkpoint in ``workdir``
(a local path or ``gs://...``) if the run's config may continue it (``resume``); on
SIGTERM (TPU VM preemption) it writes a checkpoint of the current step and raises
``Preempted``, so a caller cannot mistake a preempted run for a finished one. With several
processes, all of them stop at the same step (see ``_agree_to_stop``). No checkpoint is
written while steps are being skipped as non-finite (the last one before such a streak
stays the newest, so ``keep_checkpoints`` cannot rotate it out).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax import conditioning, sharding, stage_kinds
from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import metrics as metrics_lib
from diffusion_jax.training import preview as preview_lib
from diffusion_jax.training import resume as resume_lib
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import workdir_lock
from diffusion_jax.training.step import StepSettings, train_step


class TextEncoderLike(Protocol):
  def encode(self, prompts: list[str]) -> tuple[Any, Any]:
    """-> (embeddings [B, L, D], mask [B, L] bool)."""


class TrainableTextEncoder(TextEncoderLike, Protocol):
  """What the loop needs of a text encoder that trains with the U-Net (a
  ``diffusion_jax.text.TextEncoder`` with ``trainable=True``)."""

  trainable: bool
  module: nn.Module
  params: Any
  max_length: int
  width: int

  def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens [B, L] int32, mask [B, L] bool)."""

  def apply(self, params: Any, tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """-> embeddings [B, L, D] float32."""

  def param_boxes(self) -> Any:
    """The params' abstract tree, boxed with logical axis names."""


class DataIterator(Protocol):
  def __next__(self) -> dict: ...
  def get_state(self) -> Any: ...
  def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How long to train, what to log and when to save.

  ``num_steps`` is the step to stop at (a resumed run continues up to it);
  ``time_budget_s`` additionally stops after that much wall-clock time in this process.
  ``allow_data_restart``: resume even when the checkpoint's data-iterator states cannot be
  given to this run's processes (another process count), restarting the input stream.
  ``recover_from_intact``: when the newest checkpoint is unreadable, resume from the
  newest intact one (the unreadable ones are moved aside) instead of stopping.
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
  allow_data_restart: bool = False
  recover_from_intact: bool = False
  eval_every: int = 0  # steps between calls of train()'s evaluator (0: never)

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


class Preempted(Exception):  # noqa: N818  (not an error: the run stopped on request)
  """SIGTERM stopped the run after it saved a checkpoint of ``step``: rerun to resume."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


DataRestartError = resume_lib.DataRestartError

class WorkdirWriteError(RuntimeError):
  """Writing to the workdir failed (a full disk, lost permissions); one-line message."""


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


def check_workdir(workdir: str | epath.PathLike) -> epath.Path:
  """Creates ``workdir`` (local or ``gs://...``) and checks this process can write there.

  Raises ValueError with one line saying why not, before anything is loaded or compiled.
  """
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except (OSError, ImportError) as e:  # ImportError: gs:// without gcsfs installed
    raise ValueError(f"workdir {workdir} cannot be created or written to ("
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}); "
                     "pass a --workdir you can write to.") from None
  return path


def _trainable(text_encoder) -> bool:
  return bool(getattr(text_encoder, "trainable", False))


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
  if getattr(model_cfg, "cond_image_channels", 0):
    inputs["cond_image"] = jnp.zeros((1, resolution, resolution, model_cfg.cond_image_channels))
  if getattr(model_cfg, "image_embed_dim", None) is not None:
    inputs["image_embed"] = jnp.zeros((1, model_cfg.image_embed_dim))
  if getattr(model_cfg, "micro_cond_dim", 0):
    inputs["micro_cond"] = jnp.zeros((1, model_cfg.micro_cond_dim))
  return inputs


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def state_spec(model: nn.Module, tx, inputs: dict, mesh, rules,
               text_encoder: TrainableTextEncoder | None = None):
  """(init_state(key[, text_params]) -> boxed TrainState, its abstract shapes, its
  NamedShardings).

  With a trainable ``text_encoder``, ``init_state`` takes its initial params, which join
  the state sharded by their logical axis names like the U-Net's.
  """
  text_boxes = None if text_encoder is None else text_encoder.param_boxes()

  def init_state(key, text_params=None):
    params = model.init(key, **inputs)["params"]  # boxed with logical axis names
    if text_boxes is not None:
      text_params = jax.tree.map(lambda box, value: box.replace_boxed(value), text_boxes,
                                 text_params, is_leaf=_is_box)
    return state_lib.create_train_state(params, tx, key, text_params)

  args = (jax.random.key(0),) + (() if text_encoder is None else (text_encoder.params,))
  abstract = jax.eval_shape(init_state, *args)
  return init_state, abstract, sharding.shardings_from_abstract(abstract, mesh, rules)


def restore_ema_params(workdir: str | epath.PathLike, *, model: nn.Module,
                       loop: LoopSettings, text_len: int, text_dim: int,
                       step: int | None = None):
  """(EMA params of a training run's latest (or given) checkpoint, its step), placed on
  this process's mesh. Only the U-Net's EMA params are read (a partial restore: the
  optimizer state and a jointly trained text encoder stay on disk).
  """
  mesh = sharding.make_mesh(dict(loop.mesh_axes))
  inputs = init_inputs(model.config, loop.resolution, loop.lowres_resolution, text_len,
                       text_dim)
  boxed = jax.eval_shape(lambda key: model.init(key, **inputs)["params"], jax.random.key(0))
  target = ckpt_lib.abstract_with_shardings(
      nn.unbox(boxed), sharding.shardings_from_abstract(boxed, mesh, loop.rules))
  checkpointer = ckpt_lib.Checkpointer(workdir, create=False)
  try:
    step = _checkpoint_step(checkpointer, step, workdir)
    params = checkpointer.restore_fields({"ema_params": target}, step)["ema_params"]
  finally:
    checkpointer.close()
  return params, step


def restore_text_ema_params(workdir: str | epath.PathLike, text_encoder,
                            step: int | None = None):
  """(EMA params of the text encoder a run trained with its U-Net, the step), shaped and
  placed like ``text_encoder.params`` (built as the run's config says, e.g. t5-offline).

  Raises ValueError when the run's encoder was frozen (its checkpoints hold no text
  params), FileNotFoundError when there is no checkpoint (at ``step``).
  """
  checkpointer = ckpt_lib.Checkpointer(workdir, create=False)
  try:
    step = _checkpoint_step(checkpointer, step, workdir)
    if checkpointer.saved_fields(step).get("text_ema_params") is None:
      raise ValueError(f"The checkpoint at step {step} in {checkpointer.directory} holds no "
                       "text-encoder params: that run's encoder was frozen "
                       "(config.text.trainable=False).")
    # Single-device encoders restore onto the first local device, sharded ones onto
    # their own shardings.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=getattr(
            p, "sharding", device) if getattr(text_encoder, "mesh", None) else device),
        text_encoder.params)
    params = checkpointer.restore_fields({"text_ema_params": target},
                                         step)["text_ema_params"]
  finally:
    checkpointer.close()
  return params, step


def _checkpoint_step(checkpointer: ckpt_lib.Checkpointer, step: int | None,
                     workdir: str | epath.PathLike) -> int:
  """``step`` (None: the latest) if ``workdir`` has a checkpoint there, else
  FileNotFoundError naming the steps it has."""
  if step is not None:
    available = sorted(checkpointer.all_steps())
    if step not in available:
      raise FileNotFoundError(f"{workdir} has no checkpoint at step {step}; it has steps "
                              f"{available or 'none'}.")
    return step
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}: train this stage "
                            "first (experiments/train.py --workdir=...).")
  return step


def encode_null(text_encoder: TextEncoderLike) -> dict:
  """The empty prompt as the train step's null condition: {"text_emb": [L, D],
  "text_mask": [L]}, or {"text_tokens": [L], "text_mask": [L]} for a trainable encoder."""
  if _trainable(text_encoder):
    tokens, mask = text_encoder.tokenize([""])
    return {"text_tokens": jnp.asarray(tokens[0]), "text_mask": jnp.asarray(mask[0])}
  emb, mask = text_encoder.encode([""])
  return {"text_emb": jnp.asarray(emb[0]), "text_mask": jnp.asarray(mask[0])}


def _model_batch(batch: dict, text_encoder: TextEncoderLike, condition_keys=()) -> dict:
  """Host batch (images, captions) -> the arrays the train step takes (this process's
  rows: each process encodes or tokenizes its own captions). ``condition_keys``: arrays
  of the stage's conditions copied through when the host batch has them."""
  captions = [str(c) for c in batch["caption"]]
  out = {"image": np.asarray(batch["image"], np.float32)}
  if _trainable(text_encoder):
    tokens, mask = text_encoder.tokenize(captions)
    out["text_tokens"] = np.asarray(tokens, np.int32)
  else:
    emb, mask = text_encoder.encode(captions)
    out["text_emb"] = np.asarray(emb, np.float32)
  out["text_mask"] = np.asarray(mask, bool)
  if "lowres" in batch:
    out["lowres"] = np.asarray(batch["lowres"], np.float32)
  for key in condition_keys:
    if key in batch:
      out[key] = np.asarray(batch[key], np.float32)
  return out


def _prepare_conditions(conditions, batch: dict, batch_shardings: dict) -> dict:
  """The conditions' ``prepare_batch`` (e.g. an image embedding from a frozen encoder),
  each array then placed as the step's in_shardings expect (no-op when it already is)."""
  for condition in conditions:
    batch = condition.prepare_batch(batch)
  return {k: jax.device_put(v, batch_shardings[k]) if k in batch_shardings else v
          for k, v in batch.items()}


def _batch_shardings(mesh, rules, trainable_text: bool, super_resolution: bool,
                     condition_ndims: dict | None = None) -> dict:
  """NamedShardings of the global batch the step takes (``_model_batch``'s arrays and the
  conditions' ``prepare_batch`` outputs), split along the batch."""
  ndims = {"image": 4, "text_mask": 2}
  ndims.update({"text_tokens": 2} if trainable_text else {"text_emb": 3})
  if super_resolution:
    ndims["lowres"] = 4
  ndims.update(condition_ndims or {})
  return {name: sharding.batch_sharding(mesh, rules, n) for name, n in ndims.items()}


def _agree_to_stop(out_of_time: bool, preempted: bool) -> tuple[bool, bool]:
  """(out_of_time, preempted) as any process sees them.

  The SIGTERM flag and the time budget are per process, but the checkpoint save is a
  collective: if one host stopped a step earlier than another, both would hang. Several
  processes therefore all-gather both flags every step (a few bytes, but it waits for the
  previous step, so the host no longer runs ahead of the devices); one process pays
  nothing.
  """
  if jax.process_count() == 1:
    return out_of_time, preempted
  from jax.experimental import multihost_utils

  flags = np.asarray(multihost_utils.process_allgather(
      np.asarray([out_of_time, preempted], np.int32))).reshape(-1, 2)
  return bool(flags[:, 0].any()), bool(flags[:, 1].any())


def train(workdir: str | epath.PathLike, *, model: nn.Module, loop: LoopSettings,
          step_settings: StepSettings, optimizer: state_lib.OptimizerSettings,
          data_factory: Callable[[], Iterator[dict]], text_encoder: TextEncoderLike,
          config_json: dict | None = None,
          resume_rules: resume_lib.ResumeRules | None = None,
          log: Callable[[str], None] = print,
          on_step_end: Callable[[int], None] | None = None,
          stage_kind: stage_kinds.PixelKind | stage_kinds.LatentKind = stage_kinds.PIXEL,
          evaluator: Callable[[Any, int], dict[str, float]] | None = None):
  """Trains ``model`` in ``workdir`` (resuming if it holds checkpoints).

  ``text_encoder``: either a frozen encoder whose ``encode`` runs on the host, on this
  process's captions only (with several processes it must be process-local, e.g. a
  TextEncoder on ``jax.local_devices()``, or an embedding cache), or a TextEncoder with
  ``trainable=True`` on the training mesh: its params then join the train state (updated
  and EMA'd with the U-Net's), the host only tokenizes and the encoder runs inside the
  loss. ``on_step_end(step)`` is called after each step's bookkeeping (tests use it).
  ``stage_kind`` (``diffusion_jax.stage_kinds``) turns each global batch into what the
  network consumes (pixels, or a frozen autoencoder's latents: then ``model`` and
  ``loop.resolution`` are the latent's) and decodes previews. ``evaluator(state, step)``,
  called every ``loop.eval_every`` steps (and at the last), returns scalars for the metric
  writer (e.g. a small ShapesEval on the EMA params).

  ``config_json`` is stored with every checkpoint and, once the run is accepted, as
  ``workdir/config.json``; a resume whose config differs from the checkpoint's beyond
  ``resume_rules.may_change`` raises ``resume.IncompatibleResumeError`` first (default
  rules: nothing may change). Another live run in ``workdir`` raises
  ``workdir_lock.WorkdirLockedError``. Returns (final TrainState, last summarised metrics)
  after ``num_steps`` or the time budget; raises ``Preempted`` after a SIGTERM's checkpoint.
  """
  workdir = check_workdir(workdir)
  with workdir_lock.hold(workdir, log=log):
    return _train(workdir, model=model, loop=loop, step_settings=step_settings,
                  optimizer=optimizer, data_factory=data_factory, text_encoder=text_encoder,
                  config_json=config_json, resume_rules=resume_rules or resume_lib.ResumeRules(),
                  log=log, on_step_end=on_step_end, stage_kind=stage_kind,
                  evaluator=evaluator)


def _train(workdir: epath.Path, *, model, loop: LoopSettings, step_settings, optimizer,
           data_factory, text_encoder, config_json, resume_rules, log, on_step_end,
           stage_kind, evaluator):
  mesh = sharding.make_mesh(dict(loop.mesh_axes))
  tx = state_lib.make_optimizer(optimizer)
  trainable_text = _trainable(text_encoder)
  null_cond = encode_null(text_encoder)
  if trainable_text:
    text_len, text_dim = text_encoder.max_length, text_encoder.width
  else:
    text_len, text_dim = null_cond["text_emb"].shape
  inputs = init_inputs(model.config, loop.resolution, loop.lowres_resolution, text_len,
                       text_dim)

  init_state, abstract, state_shardings = state_spec(
      model, tx, inputs, mesh, loop.rules, text_encoder if trainable_text else None)
  base_key = jax.random.key(loop.seed)
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=loop.keep_checkpoints)
  try:
    restored = resume_lib.restore_latest(
        checkpointer, ckpt_lib.abstract_with_shardings(nn.unbox(abstract), state_shardings),
        config_json, resume_rules, recover=loop.recover_from_intact, log=log)
  except BaseException:
    checkpointer.close()
    raise
  resumed = restored is not None
  if resumed:
    state, saved_data = restored
    log(f"Resumed from {checkpointer.directory} at step {int(state.step)}.")
  else:
    init_args = (base_key,) + ((text_encoder.params,) if trainable_text else ())
    state, _ = sharding.init_sharded(init_state, mesh, loop.rules, *init_args)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  text_params = sum(x.size for x in jax.tree.leaves(state.text_params))
  log(f"{num_params / 1e6:.2f}M U-Net parameters"
      + (f" + {text_params / 1e6:.2f}M trained text-encoder parameters" if text_params
         else "") + f" on mesh {dict(mesh.shape)}.")

  data = data_factory()
  if resumed:
    try:
      data_state = resume_lib.data_state_to_restore(saved_data, int(state.step),
                                                    loop.allow_data_restart, log)
    except DataRestartError:
      checkpointer.close()
      raise
    if data_state is not None:
      data.set_state(data_state)
  if config_json is not None and jax.process_index() == 0:  # the run is accepted now
    (workdir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  null_cond = jax.device_put(null_cond, replicated)
  conditions = step_settings.diffusion.conditions
  condition_ndims = conditioning.batch_ndims(conditions)
  batch_shardings = _batch_shardings(mesh, loop.rules, trainable_text,
                                     loop.lowres_resolution is not None, condition_ndims)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, settings=step_settings,
                        learning_rate_fn=state_lib.learning_rate_schedule(optimizer),
                        text_apply=text_encoder.apply if trainable_text else None),
      in_shardings=(state_shardings, batch_shardings,
                    jax.tree.map(lambda _: replicated, null_cond)),
      out_shardings=(state_shardings, None), donate_argnums=0)
  preview = preview_lib.make_preview(model, step_settings, loop, text_encoder, null_cond,
                                     stage_kind)

  step = int(state.step)
  writer = metrics_lib.MetricWriter(workdir, total_steps=loop.num_steps, start_step=step)
  accumulator = metrics_lib.MetricAccumulator()
  start_time = interval_start = time.time()
  interval_steps, summary, stop, completed = 0, {}, None, False
  with _Preemption() as preemption, sharding.sharding_context(mesh, loop.rules):
    try:
      while step < loop.num_steps:
        batch = stage_kind.encode_batch(sharding.host_local_to_global(
            _model_batch(next(data), text_encoder, condition_ndims), mesh, loop.rules))
        if conditions:
          batch = _prepare_conditions(conditions, batch, batch_shardings)
        state, metrics = step_fn(state, batch, null_cond)
        accumulator.add(metrics)
        step += 1
        interval_steps += 1
        own_out_of_time = (loop.time_budget_s is not None and
                           time.time() - start_time > loop.time_budget_s)
        out_of_time, preempted = _agree_to_stop(own_out_of_time, preemption.requested)
        last = step >= loop.num_steps or out_of_time or preempted
        log_now = step % loop.log_every == 0 or last
        save_now = step % loop.checkpoint_every == 0 or last
        if log_now:
          summary = accumulator.summarise()
          elapsed = time.time() - interval_start
          summary["images_per_s"] = interval_steps * loop.batch_size / max(elapsed, 1e-9)
          summary["skipped_total"] = float(state.nonfinite_total)
          writer.write(step, summary)
          writer.console(step, summary)
          interval_start, interval_steps = time.time(), 0
        if log_now or save_now or step % loop.max_nonfinite_in_a_row == 0:
          # The longest run so far, not the current one: a run that ended between two
          # looks still counts, and no checkpoint is written after one.
          longest = int(state.nonfinite_longest)
          if longest >= loop.max_nonfinite_in_a_row:
            before = checkpointer.latest_step()
            raise NonFiniteError(
                f"{longest} steps in a row had a NaN/Inf loss or gradient (by step {step});"
                " stopping. Lower the learning rate, enable gradient clipping, or check the "
                "data. " + (f"The last checkpoint written before the streak is step "
                            f"{before} in {checkpointer.directory}; rerunning resumes from "
                            "it." if before is not None else
                            "No checkpoint was written before the streak."))
        pause_start = time.time()  # checkpoints and previews don't count as step time
        # A step inside a non-finite streak is not saved: its params may be poisoned
        # already, and its saved counters would stop the resumed run at once.
        if save_now and int(state.nonfinite_in_a_row) > 0:
          log(f"Step {step}: not saving a checkpoint during a streak of "
              f"{int(state.nonfinite_in_a_row)} skipped non-finite step(s).")
        elif save_now:
          checkpointer.save(step, state, data.get_state(), config_json)
        if preview is not None and (step % loop.preview_every == 0 or last):
          preview(state, step, writer, workdir)
        if evaluator is not None and loop.eval_every and (step % loop.eval_every == 0 or last):
          writer.write(step, evaluator(state, step))
        interval_start += time.time() - pause_start
        if on_step_end is not None:
          on_step_end(step)
        if preempted:
          saved = checkpointer.latest_step()
          stop = Preempted(
              f"SIGTERM{'' if preemption.requested else ' (on another process)'} at step "
              f"{step}: " + (f"the newest checkpoint is step {saved}" if saved is not None
                             else "no checkpoint to resume from") + "; rerun the same "
              "command to resume.", step)
          log(str(stop))
          break
        if out_of_time:
          log(f"Time budget of {loop.time_budget_s:.0f}s reached at step {step}."
              if own_out_of_time else
              f"Another process reached its time budget at step {step}; stopping with it.")
          break
      completed = True
    except OSError as e:  # a metrics line, a preview, an event file: the disk is full?
      if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        raise
      saved = checkpointer.latest_step()
      raise WorkdirWriteError(
          f"Writing {e.filename or workdir} failed at step {step}: {e.strerror}. "
          + (f"The last checkpoint, step {saved}, is intact: " if saved is not None else "")
          + "free space (or fix the permissions) and rerun the same command to resume."
      ) from None
    finally:
      _close(checkpointer, writer, quietly=not completed)
  if stop is not None:
    raise stop
  return state, summary


def _close(checkpointer: ckpt_lib.Checkpointer, writer, quietly: bool) -> None:
  """Waits for the checkpointer and closes it and the writer; ``quietly`` (another error
  is on its way out) swallows their own errors so that one is what the user sees."""
  try:
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  except Exception:  # noqa: BLE001
    if not quietly:
      raise
