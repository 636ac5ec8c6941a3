"""Every configs/*.py builds, is locked and passes the checks train.py runs before
compiling; the paper-scale configs' train states are traced abstractly (jax.eval_shape:
no parameter is allocated) for their sizes and their FSDP sharding on a 64-device mesh."""

import importlib
import pathlib
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import builders  # noqa: E402

from configs import common  # noqa: E402
from diffusion_jax.models import t5  # noqa: E402
from diffusion_jax.models import unet as unet_lib  # noqa: E402
from diffusion_jax.training import loop as loop_lib  # noqa: E402
from diffusion_jax.training import state as state_lib  # noqa: E402

# Configs that are not diffusion stages, each tested by its own module's tests.
OTHER_CONFIGS = {"clip_shapes": "tests/test_clip_train.py",
                 "probe_shapes": "tests/test_probe.py",
                 "prior_shapes": "tests/test_unclip_prior.py",
                 "attribute_classifier_shapes": "tests/test_classifier_guidance.py"}
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common", *OTHER_CONFIGS))
DEVICES = 64  # e.g. a TPU v4-128 slice (64 chips)


# Arguments besides the default that each small config is also checked with.
_ARGS = {"demo_base": ("smoke",), "demo_sr": ("smoke",), "fashion_mnist": ("smoke",),
         "instruct_shapes": ("smoke",), "inpaint_shapes": ("smoke",),
         "unclip_decoder_shapes": ("smoke",),
         "emoji": ("smoke", "sr", "sr,smoke"),
         # also in tests/test_latent.py
         "autoencoder_shapes": (), "latent_shapes": ()}


def _configs(name):
  module = importlib.import_module(f"configs.{name}")
  return [module.get_config()] + [module.get_config(arg) for arg in _ARGS.get(name, ())]


def test_every_config_file_is_tested():
  # A new config file fails this until it is added here (or, if a paper config, to
  # unet.PAPER_PARAMS, which sizes the abstract train-state test below).
  assert set(CONFIGS) == set(unet_lib.PAPER_PARAMS) | set(_ARGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_is_locked_and_validates(name):
  for config in _configs(name):
    assert config.is_locked
    builders.unet_config(config)
    builders.step_settings(config)
    builders.optimizer_settings(config)
    builders.loop_settings(config)
    assert config.text.trainable is False  # frozen unless asked for


def test_a_misspelt_field_is_an_error_not_a_new_field():
  config = common.get_config()
  with pytest.raises(AttributeError, match='Did you mean "batch_size"'):
    config.train.batch_szie = 64
  with pytest.raises(AttributeError, match="trian"):
    config.trian = {}
  config.train.batch_size = 64  # every existing field stays settable
  assert config.train.batch_size == 64


def test_an_unknown_config_argument_is_an_error():
  demo_base = importlib.import_module("configs.demo_base")
  with pytest.raises(ValueError, match="':smoke', got 'smok'"):
    demo_base.get_config("smok")


def test_a_trainable_encoder_cannot_use_the_embedding_cache():
  config = _configs("demo_base")[0]
  assert config.text.cache_dir
  config.text.trainable = True
  # Raised before anything is loaded.
  with pytest.raises(builders.ConfigError, match="cannot be cached"):
    builders.text_encoder(config)


def test_a_bad_shapes_single_size_is_one_config_error(tmp_path):
  config = _configs("demo_base")[0]
  config.data.data_dir, config.data.shapes_single_size = str(tmp_path), "huge"
  with pytest.raises(builders.ConfigError, match="shapes_single_size='huge'"):
    builders.dataset_name(config)
  assert not list(tmp_path.iterdir())  # refused before anything is prepared
  # The demo's objects are large; "any" (what a command line can say for None) draws either.
  config.data.prepare = False
  for value, name in (("large", "32px_20k_max1_large"), ("any", "32px_20k_max1"),
                      (None, "32px_20k_max1")):
    config.data.shapes_single_size = value
    with pytest.raises(builders.UserError, match=f"shapes/{name} is not prepared"):
      builders.dataset_name(config)
  assert _configs("demo_base")[0].data.shapes_single_size == "large"


@pytest.mark.parametrize("name", sorted(unet_lib.PAPER_PARAMS))
def test_paper_config_train_state_abstractly(name):
  config = _configs(name)[0]
  model = unet_lib.UNet(builders.unet_config(config))
  loop = builders.loop_settings(config)
  tx = state_lib.make_optimizer(builders.optimizer_settings(config))
  assert config.text.encoder.endswith("t5-v1_1-xxl")
  text_width = t5.PRESETS["t5-v1_1-xxl"].d_model
  inputs = loop_lib.init_inputs(model.config, loop.resolution, loop.lowres_resolution,
                                config.text.max_length, text_width)  # batch 1: kilobytes
  mesh = AbstractMesh((DEVICES, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  _, abstract, shardings = loop_lib.state_spec(model, tx, inputs, mesh, loop.rules)
  state = nn.unbox(abstract)
  count = sum(x.size for x in jax.tree.leaves(state.params))
  paper = unet_lib.PAPER_PARAMS[name]
  assert 0.75 * paper < count < 1.25 * paper, count
  assert sum(x.size for x in jax.tree.leaves(state.ema_params)) == count
  # AdamW keeps two moments per parameter (plus step counters).
  assert 2 * count <= sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * count + 8
  # FSDP: each of the 64 devices holds ~1/64 of the state (small vectors replicate).
  full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  per_device = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                   for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(state),
                                   strict=True))
  assert full / DEVICES <= per_device < 1.05 * full / DEVICES, (per_device, full)
  assert loop.batch_size % DEVICES == 0


def test_a_trainable_encoder_joins_the_abstract_train_state():
  from diffusion_jax.text import TextEncoder

  config = _configs("demo_base")[1]
  encoder = TextEncoder.from_pretrained("t5-offline", max_length=config.text.max_length,
                                        trainable=True)
  model = unet_lib.UNet(builders.unet_config(config))
  loop = builders.loop_settings(config)
  tx = state_lib.make_optimizer(builders.optimizer_settings(config))
  inputs = loop_lib.init_inputs(model.config, loop.resolution, None, encoder.max_length,
                                encoder.width)
  mesh = AbstractMesh((8, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  _, abstract, shardings = loop_lib.state_spec(model, tx, inputs, mesh, loop.rules, encoder)
  state = nn.unbox(abstract)
  text_count = sum(x.size for x in jax.tree.leaves(encoder.params))
  assert sum(x.size for x in jax.tree.leaves(state.text_params)) == text_count
  assert sum(x.size for x in jax.tree.leaves(state.text_ema_params)) == text_count
  unet_count = sum(x.size for x in jax.tree.leaves(state.params))
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) >= 2 * (unet_count + text_count)
  # The encoder's kernels shard by their logical names, like the U-Net's.
  assert any("data" in str(s.spec) for s in jax.tree.leaves(shardings.text_params))
