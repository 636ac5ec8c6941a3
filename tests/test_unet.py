"""Efficient U-Net: shapes per preset, conditioning behaviour, paper-scale parameter counts."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import layers, unet
from diffusion_jax.models.unet import Level, UNet, UNetConfig

TINY = UNetConfig(
    levels=(Level(1, 1), Level(2, 1, self_attention=True, cross_attention=True)),
    base_channels=16, cond_dim=32, num_heads=2, resolution=8, text_width=12, text_length=5)
TINY_SR = dataclasses.replace(TINY, super_resolution=True, lowres_resolution=4)


def random_params(shapes, key):
  """Random parameters of the given shapes, at roughly init scale but with no zero layers.

  A fresh U-Net's zero-initialised output layers make its output exactly 0, so tests of
  conditioning use random weights instead; generating them skips compiling ``init``.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(key, len(flat))
  values = []
  for (path, shape), k in zip(flat, keys, strict=True):
    noise = jax.random.normal(k, shape.shape, shape.dtype)
    name = jax.tree_util.keystr(path[-1:])
    if "scale" in name:
      values.append(1.0 + 0.1 * noise)
    elif "bias" in name:
      values.append(0.1 * noise)
    else:
      values.append(noise / np.sqrt(max(np.prod(shape.shape[:-1]), 1)))
  return treedef.unflatten(values)


def random_inputs(config, key, batch=2):
  k = jax.random.split(key, 5)
  res, low = config.resolution, config.lowres_resolution
  inputs = dict(
      x_t=jax.random.normal(k[0], (batch, res, res, 3)),
      logsnr=jnp.linspace(-5.0, 5.0, batch),
      text_emb=jax.random.normal(k[1], (batch, config.text_length, config.text_width)),
      text_mask=jnp.arange(config.text_length)[None, :] < jnp.array([3, 5])[:batch, None])
  if config.super_resolution:
    inputs["lowres"] = jax.random.uniform(k[2], (batch, low, low, 3), minval=-1, maxval=1)
    inputs["lowres_logsnr"] = jnp.array([2.0, 4.0])[:batch]
  return inputs


def build(config, seed=0):
  model = UNet(config)
  inputs = random_inputs(config, jax.random.key(seed))
  shapes = jax.eval_shape(model.init, jax.random.key(seed), **inputs)["params"]
  params = random_params(nn.unbox(shapes), jax.random.key(seed + 1))
  apply = jax.jit(lambda p, inp: model.apply({"params": p}, **inp))
  return params, inputs, apply


@pytest.fixture(scope="module", params=["mean", "attention"])
def tiny(request):
  return build(dataclasses.replace(TINY, text_pooling=request.param))


@pytest.fixture(scope="module")
def tiny_sr():
  return build(TINY_SR)


@pytest.mark.parametrize("name", sorted(unet.PRESETS))
def test_preset_output_shape(name):
  """Every preset, paper-scale ones included, traced abstractly (nothing is allocated)."""
  config = unet.PRESETS[name]
  inputs = unet.example_inputs(config, batch=2)
  model = UNet(config)
  variables = jax.eval_shape(model.init, jax.random.key(0), **inputs)
  out = jax.eval_shape(model.apply, variables, **inputs)
  assert out.shape == (2, config.resolution, config.resolution, config.out_channels)
  assert out.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(unet.PAPER_PARAMS))
def test_paper_preset_param_counts(name):
  count = unet.count_params(unet.PRESETS[name], resolution=64)
  paper = unet.PAPER_PARAMS[name]
  print(f"{name}: {count / 1e6:.0f}M params, paper {paper / 1e6:.0f}M ({count / paper:.2f}x)")
  assert abs(count / paper - 1) < 0.15


def test_every_parameter_has_logical_names():
  inputs = random_inputs(TINY_SR, jax.random.key(0))
  boxed = jax.eval_shape(UNet(TINY_SR).init, jax.random.key(0), **inputs)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)


def test_output_depends_on_text(tiny):
  params, inputs, apply = tiny
  out = apply(params, inputs)
  assert out.shape == inputs["x_t"].shape and bool(jnp.all(jnp.isfinite(out)))
  # A random change: a constant shift of a token would vanish in the LayerNorm.
  change = jax.random.normal(jax.random.key(3), inputs["text_emb"][:, 0].shape)
  changed = dict(inputs, text_emb=inputs["text_emb"].at[:, 0].add(change))
  assert float(jnp.abs(apply(params, changed) - out).max()) > 1e-4


def test_padded_tokens_do_not_change_output(tiny):
  params, inputs, apply = tiny
  out = apply(params, inputs)
  noise = 100.0 * jax.random.normal(jax.random.key(7), inputs["text_emb"].shape)
  padded = ~inputs["text_mask"][..., None]
  changed = dict(inputs, text_emb=jnp.where(padded, noise, inputs["text_emb"]))
  np.testing.assert_allclose(apply(params, changed), out, rtol=0, atol=1e-6)


def test_fully_masked_text_is_finite(tiny):
  params, inputs, apply = tiny
  out = apply(params, dict(inputs, text_mask=jnp.zeros_like(inputs["text_mask"])))
  assert bool(jnp.all(jnp.isfinite(out)))


def test_sr_output_depends_on_lowres_and_its_noise_level(tiny_sr):
  params, inputs, apply = tiny_sr
  out = apply(params, inputs)
  assert out.shape == inputs["x_t"].shape
  other_image = dict(inputs, lowres=-inputs["lowres"])
  assert float(jnp.abs(apply(params, other_image) - out).max()) > 1e-4
  other_level = dict(inputs, lowres_logsnr=inputs["lowres_logsnr"] - 3.0)
  assert float(jnp.abs(apply(params, other_level) - out).max()) > 1e-4


def test_bf16_compute_keeps_float32_params(tiny_sr):
  params, inputs, apply = tiny_sr
  bf16 = UNet(dataclasses.replace(TINY_SR, dtype="bfloat16"))
  out_bf16 = jax.jit(lambda p: bf16.apply({"params": p}, **inputs))(params)
  out = apply(params, inputs)
  assert out_bf16.dtype == jnp.float32
  assert float(jnp.abs(out_bf16 - out).max()) < 0.05 * float(jnp.abs(out).max())
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
  config = dataclasses.replace(TINY, levels=TINY.levels[1:])
  params, inputs, _ = build(config)

  def loss_and_grads(cfg):
    loss = lambda p: jnp.mean(UNet(cfg).apply({"params": p}, **inputs) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  value, grads = loss_and_grads(config)
  value_remat, grads_remat = loss_and_grads(dataclasses.replace(config, remat=True))
  np.testing.assert_allclose(value_remat, value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads_remat, grads)


def test_dropout_only_in_training():
  config = dataclasses.replace(TINY, levels=TINY.levels[:1], dropout=0.5)
  params, inputs, _ = build(config)
  model = UNet(config)
  run = jax.jit(lambda key, train: model.apply({"params": params}, **inputs, train=train,
                                               rngs={"dropout": key}), static_argnums=1)
  np.testing.assert_array_equal(run(jax.random.key(1), False), run(jax.random.key(2), False))
  assert float(jnp.abs(run(jax.random.key(1), True) - run(jax.random.key(2), True)).max()) > 0


@pytest.mark.parametrize("masked", [False, True])
def test_pairwise_attention_equals_dense(masked):
  """The long-sequence path (one (image, head) pair at a time, recomputed in the backward
  pass) gives the dense result and gradients."""
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (3, 2, 40, 8))
  k, v = (jax.random.normal(key, (3, 2, 24, 8)) for key in ks[1:3])
  mask = jax.random.bernoulli(ks[3], 0.6, (3, 24)).at[:, 0].set(True) if masked else None

  def loss(q, k, v, pairwise):
    return jnp.sum(jnp.sin(layers.attention(q, k, v, mask, pairwise=pairwise)))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  (dense, dense_grads), (pairs, pair_grads) = grad(q, k, v, False), grad(q, k, v, True)
  np.testing.assert_allclose(pairs, dense, rtol=1e-6)
  for a, b in zip(pair_grads, dense_grads, strict=True):
    np.testing.assert_allclose(a, b, atol=2e-6)
  # Long sequences take the pairwise path (a loop over the pairs) by default.
  long_q = jax.random.normal(ks[0], (2, 1, layers.PAIRWISE_MIN_POSITIONS // 24 + 1, 8))
  k, v = k[:2, :1], v[:2, :1]
  np.testing.assert_allclose(layers.attention(long_q, k, v),
                             layers.dense_attention(long_q, k, v), atol=1e-6)
  assert "stablehlo.while" in jax.jit(layers.attention).lower(long_q, k, v).as_text()
  assert "stablehlo.while" not in jax.jit(layers.attention).lower(long_q[:, :, :-1], k,
                                                                   v).as_text()


def test_logsnr_features_are_finite_at_the_ends():
  feats = layers.logsnr_features(jnp.array([-jnp.inf, -3.0, 0.0, 3.0, jnp.inf]), 16)
  assert feats.shape == (5, 16) and bool(jnp.all(jnp.isfinite(feats)))
  assert float(jnp.abs(feats[1] - feats[3]).max()) > 0.1


@pytest.mark.parametrize("bad, message", [
    (dict(x_t=jnp.zeros((2, 8, 8))), "NHWC"),
    (dict(x_t=jnp.zeros((2, 9, 9, 3))), "divisible"),
    (dict(logsnr=jnp.zeros((3,))), "logsnr"),
    (dict(text_mask=jnp.ones((2, 4), bool)), "text_mask"),
    (dict(lowres=jnp.zeros((2, 4, 4, 3))), "super_resolution"),
])
def test_bad_inputs_raise_one_clear_error(bad, message):
  inputs = dict(random_inputs(TINY, jax.random.key(0)), **bad)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(UNet(TINY).init, jax.random.key(0), **inputs)


def test_decoder_skips_are_the_encoder_outputs_scaled_by_one_over_sqrt_2():
  """Imagen's Efficient U-Net scales each skip connection by 1/sqrt(2) (Saharia et al. 2022,
  appendix F): the decoder's first block of level i must receive [h, skip_i / sqrt(2)],
  skip_i being what the encoder's last block of level i returned. Both are intercepted."""
  params, inputs, _ = build(TINY)
  model = UNet(TINY)

  def run(p, inp):
    calls = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      name = context.module.name or ""
      if context.method_name == "__call__" and "_block_" in name:
        calls[name] = (args[0], out)
      return out

    with nn.intercept_methods(record):
      model.apply({"params": p}, **inp)
    return calls

  calls = jax.jit(run)(params, inputs)
  for i, level in enumerate(TINY.levels):
    skip = calls[f"down_{i}_block_{level.num_res_blocks - 1}"][1]
    decoder_in = calls[f"up_{i}_block_0"][0]
    assert float(jnp.abs(skip).max()) > 0.1
    np.testing.assert_allclose(decoder_in[..., -skip.shape[-1]:], skip / np.sqrt(2.0),
                               rtol=1e-6, atol=1e-6)
