"""Config -> library objects for latent diffusion: training an autoencoder
(experiments/train_autoencoder.py) and the latent stage kind of a U-Net stage whose config
sets ``config.autoencoder.directory`` (training: builders.run_training; sampling:
experiments/sampling.py). Every check raises builders.UserError with one line.
"""

from __future__ import annotations

import dataclasses

import builders
import ml_collections
from builders import ConfigError, UserError

from diffusion_jax.models import autoencoder as ae


def autoencoder_config(config: ml_collections.ConfigDict) -> ae.AutoencoderConfig:
  a = config.autoencoder
  return builders.checked(
      "config.autoencoder", ae.AutoencoderConfig, block_out_channels=tuple(a.block_out_channels),
      layers_per_block=a.layers_per_block, latent_channels=a.latent_channels,
      norm_num_groups=a.norm_num_groups, dtype=config.model.dtype)


def run_autoencoder_training(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates the config, then trains an autoencoder in ``workdir`` and exports it."""
  from diffusion_jax.training import autoencoder as ae_train
  from diffusion_jax.training import loop as loop_lib

  if config.autoencoder.directory:
    raise ConfigError("config.autoencoder.directory is set: that names a trained autoencoder "
                      "for a latent stage (experiments/train.py); unset it to train one here.")
  ae_cfg = autoencoder_config(config)
  a, t = config.autoencoder, config.train
  loss = builders.checked("config.autoencoder", ae_train.LossSettings, l1_weight=a.l1_weight,
                          l2_weight=a.l2_weight, kl_weight=a.kl_weight)
  if config.data.resolution % ae_cfg.downsample_factor:
    raise ConfigError(f"config.data.resolution={config.data.resolution} must divide by the "
                      f"autoencoder's downsampling factor {ae_cfg.downsample_factor} "
                      f"(config.autoencoder.block_out_channels={a.block_out_channels}).")
  loop = builders.checked(
      "config.train", ae_train.AutoencoderLoop, num_steps=t.num_steps, batch_size=t.batch_size,
      resolution=config.data.resolution, seed=t.seed, log_every=t.log_every,
      checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
      scale_batches=a.scale_batches,
      mesh_axes=(("data", config.mesh.data), ("model", config.mesh.model)),
      rules=builders.RULES[config.mesh.rules])
  optimizer = builders.optimizer_settings(config)
  try:
    loop_lib.check_workdir(workdir)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  factory = builders.data_factory(config)
  report = ae_train.train(workdir, config=ae_cfg, loop=loop, loss=loss, optimizer=optimizer,
                          data_factory=factory, config_json=config.to_dict())
  scenes = a.get("probe_scenes", 0)
  if scenes and "export" in report and builders.dataset_name(config).startswith("shapes"):
    report = _add_probe_report(workdir, report, config.data.resolution, scenes)
  return report


def reconstructions_fn(autoencoder: ae.PretrainedAutoencoder, batch_size: int = 100):
  """uint8 images [N, R, R, 3] -> their reconstructions (posterior mean, decoded), uint8."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from diffusion_jax import images as images_lib

  model = autoencoder.model

  @jax.jit
  def roundtrip(params, x):
    return jnp.clip(ae.decode_fn(model, params)(ae.encode_fn(model, params)(x)), -1, 1)

  def reconstruct(images):
    out = []
    for start in range(0, len(images), batch_size):
      x = jnp.asarray(images[start:start + batch_size], jnp.float32) / 127.5 - 1.0
      out.append(images_lib.to_uint8(np.asarray(roundtrip(autoencoder.params, x))))
    return np.concatenate(out)

  return reconstruct


def probe_on_reconstructions(directory: str, resolution: int, scenes: int, probe=None) -> dict:
  """The shapes probe's per-attribute accuracy on ``scenes`` real validation and
  test_compositional images at ``resolution`` and on their reconstructions by the
  autoencoder in ``directory``: {"real": ..., "reconstructed": ...}."""
  from diffusion_jax.evaluation import probe as probe_lib
  from diffusion_jax.evaluation import probe_accuracy

  probe = probe or probe_lib.load_or_train(log=print)
  plan = ((resolution, scenes),)
  return {"real": probe_accuracy.measure(probe, plan),
          "reconstructed": probe_accuracy.measure(
              probe, plan, transform=reconstructions_fn(load_autoencoder(directory)))}


def _add_probe_report(workdir: str, report: dict, resolution: int, scenes: int) -> dict:
  import json
  import pathlib

  from diffusion_jax.evaluation import probe_accuracy

  accuracy = probe_on_reconstructions(report["export"], resolution, scenes)
  for name in ("real", "reconstructed"):
    print(f"probe on {name} images: {probe_accuracy.summary(accuracy[name])}")
  report = dict(report, probe_accuracy=accuracy)
  path = pathlib.Path(workdir) / "autoencoder.json"
  path.write_text(json.dumps(report, indent=2))
  return report


def load_autoencoder(directory: str, mesh=None, rules=None) -> ae.PretrainedAutoencoder:
  """The frozen autoencoder of a latent stage, or a UserError naming what is missing."""
  kwargs = {} if rules is None else {"rules": rules}
  try:
    return ae.load_diffusers(directory, mesh=mesh, **kwargs)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"config.autoencoder.directory={directory!r}: {e}") from None


def latent_unet_config(config: ml_collections.ConfigDict, unet_cfg, ae_cfg: ae.AutoencoderConfig):
  """The U-Net config of a latent stage: the latent's channels and size, or a UserError
  when the pixel size does not chain through the autoencoder and the U-Net's levels."""
  res, f = config.data.resolution, ae_cfg.downsample_factor
  directory = config.autoencoder.directory
  if unet_cfg.super_resolution:
    raise ConfigError(f"config.autoencoder.directory={directory!r} with the super-resolution "
                      f"preset {config.model.preset!r}: latent stages are base stages (pixel "
                      "super-resolution stages may follow them); pick a base preset.")
  if res % f:
    raise ConfigError(f"config.data.resolution={res} does not chain with the autoencoder in "
                      f"{directory} (downsampling factor {f}): use a multiple of {f}.")
  latent_res = res // f
  factor = 2 ** (len(unet_cfg.levels) - 1)
  if latent_res % factor:
    raise ConfigError(f"config.data.resolution={res} gives {latent_res} px latents (f={f}), "
                      f"which preset {config.model.preset!r} cannot take ({len(unet_cfg.levels)}"
                      f" levels need a multiple of {factor}): use a multiple of {f * factor}.")
  return dataclasses.replace(unet_cfg, in_channels=ae_cfg.latent_channels,
                             out_channels=ae_cfg.latent_channels, resolution=latent_res)


def _directory(config: ml_collections.ConfigDict) -> str | None:
  """config.autoencoder.directory (None in workdirs written before latent stages existed)."""
  return (config.get("autoencoder") or {}).get("directory")


def _autoencoder_config_of(directory: str) -> ae.AutoencoderConfig:
  """The AutoencoderConfig in ``directory``, checking its weights exist (nothing is read)."""
  import pathlib

  from diffusion_jax.models import hf_checkpoint

  path = pathlib.Path(directory).expanduser()
  try:
    if not path.is_dir():
      raise FileNotFoundError(f"{path.resolve()} does not exist; train one with "
                              "experiments/train_autoencoder.py (it exports <workdir>/"
                              "autoencoder) or pass a diffusers AutoencoderKL directory.")
    config = ae.AutoencoderConfig.from_diffusers(hf_checkpoint.read_config(path))
    ae.weight_files(path)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"config.autoencoder.directory={directory!r}: {e}") from None
  return config


def stage_unet_config(config: ml_collections.ConfigDict, unet_cfg):
  """``unet_cfg`` as this stage's kind needs it: unchanged for pixel stages, the latent's
  channels and size for latent stages (checked to chain; no weights read); then with the
  inputs of its conditions (conditioning_builders)."""
  import conditioning_builders

  directory = _directory(config)
  if directory:
    unet_cfg = latent_unet_config(config, unet_cfg, _autoencoder_config_of(directory))
  return conditioning_builders.stage_unet_config(config, unet_cfg, latent=bool(directory))


def spec_defaults(config: ml_collections.ConfigDict) -> dict:
  """Sampling defaults of the stage's kind (flags override them)."""
  if not _directory(config):
    return {}
  from diffusion_jax import stage_kinds
  return {"threshold": stage_kinds.LatentKind.default_threshold}


def stage_kind(config: ml_collections.ConfigDict, mesh=None, rules=None, *,
               training: bool = False):
  """The stage kind of ``config``: PIXEL, or a LatentKind with its frozen autoencoder
  loaded (onto ``mesh`` by ``rules`` when given); for ``training``, with a latent cache of
  ``config.autoencoder.latent_cache_mb`` (0: none)."""
  import pathlib

  from diffusion_jax import stage_kinds

  directory = _directory(config)
  if not directory:
    return stage_kinds.PIXEL
  _autoencoder_config_of(directory)
  cache = None
  if training:
    megabytes = config.autoencoder.get("latent_cache_mb", 0)
    if not isinstance(megabytes, (int, float)) or isinstance(megabytes, bool) or megabytes < 0:
      raise ConfigError(f"config.autoencoder.latent_cache_mb={megabytes!r}: use a size in MB "
                        ">= 0 (0: encode every batch).")
    cache = stage_kinds.LatentCache(int(megabytes * 2**20)) if megabytes else None
  resolved = str(pathlib.Path(directory).expanduser().resolve())
  return stage_kinds.LatentKind(load_autoencoder(resolved, mesh, rules), resolved, cache=cache)


def for_training(config: ml_collections.ConfigDict, unet_cfg, loop, mesh, rules):
  """(stage kind, U-Net config, loop settings) of a stage about to train: a latent stage's
  network and loop resolution are the latent's."""
  unet_cfg = stage_unet_config(config, unet_cfg)
  kind = stage_kind(config, mesh, rules, training=True)
  return kind, unet_cfg, dataclasses.replace(loop, resolution=unet_cfg.resolution)
