"""Convolutions as matmuls (models/fast_conv.py): equal to lax.conv, forward and gradient,
with nn.Conv's parameters; a whole U-Net gives the same output whichever runs."""

import dataclasses
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import fast_conv, layers, unet
from tests.test_unet import TINY_SR, random_inputs, random_params

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import builders  # noqa: E402

from configs import common  # noqa: E402

# (input [B, H, W, Cin], kernel size, stride, Cout): the U-Net's convolutions (3x3 SAME,
# the strided 3x3 of Downsample, the 1x1 skip, the stem from 3 or 6 image channels, the
# 3-channel output), plus an odd size whose strided SAME padding is asymmetric.
CASES = [
    ((2, 8, 8, 6), 3, 1, 16),
    ((2, 8, 8, 16), 3, 1, 3),
    ((2, 8, 8, 16), 3, 2, 32),
    ((2, 7, 9, 8), 3, 2, 8),
    ((2, 8, 8, 16), 1, 1, 24),
    ((3, 4, 4, 32), 3, 1, 32),
]


def reference(x, kernel, stride, padding="SAME"):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape,size,stride,out", CASES)
def test_conv2d_equals_lax_conv_forward_and_gradient(shape, size, stride, out):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (size, size, shape[-1], out)) / np.sqrt(size * size * shape[-1])

  @jax.jit
  def outputs_and_gradients(x, kernel):
    """Per implementation: the output and the vjp of a random cotangent (x and kernel)."""
    fns = {"xla": lambda x, k: reference(x, k, stride)}
    for impl in ("matmul", "shifted"):
      fns[impl] = lambda x, k, impl=impl: fast_conv.conv2d(x, k, (stride, stride), impl=impl)
    results = {}
    for impl, fn in fns.items():
      y, vjp = jax.vjp(fn, x, kernel)
      results[impl] = (y, *vjp(jax.random.normal(kg, y.shape)))
    return results

  results = outputs_and_gradients(x, kernel)
  ref = results.pop("xla")
  for impl, ours in results.items():
    for name, a, b in zip(("output", "d/dx", "d/dkernel"), ours, ref, strict=True):
      assert a.shape == b.shape, (impl, name)
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=f"{impl} {name}")


def test_conv2d_explicit_padding_and_bfloat16():
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))
  kernel = jax.random.normal(jax.random.key(2), (3, 3, 8, 8)) / 8.0
  padding = ((2, 0), (1, 1))
  np.testing.assert_allclose(fast_conv.conv2d(x, kernel, padding=padding),
                             reference(x, kernel, 1, padding), rtol=1e-5, atol=1e-5)
  low = fast_conv.conv2d(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(low.astype(jnp.float32), reference(x, kernel, 1), atol=0.1)


def test_unsupported_convolutions_fall_back_to_lax():
  conv = fast_conv.conv_general_dilated("matmul")
  x = jax.random.normal(jax.random.key(3), (1, 6, 6, 4))
  kernel = jax.random.normal(jax.random.key(4), (3, 3, 2, 4))
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
  grouped = conv(x, kernel, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
  np.testing.assert_allclose(grouped, jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2), rtol=1e-6)
  assert fast_conv.conv_general_dilated("xla") is jax.lax.conv_general_dilated
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    fast_conv.conv_general_dilated("fft")


@pytest.mark.parametrize("impl", ["matmul", "shifted"])
def test_layers_conv_keeps_nn_conv_parameters(impl):
  x = jnp.ones((1, 8, 8, 4))
  make = lambda impl: layers.conv(8, jnp.float32, strides=2, name="c", impl=impl)
  plain = make("xla").init(jax.random.key(0), x)
  fast = make(impl).init(jax.random.key(0), x)
  # Same names, shapes, initial values and logical axis names (sharding rules apply alike).
  assert jax.tree.structure(plain) == jax.tree.structure(fast)
  for a, b in zip(jax.tree.leaves(plain, is_leaf=lambda v: isinstance(v, nn.Partitioned)),
                  jax.tree.leaves(fast, is_leaf=lambda v: isinstance(v, nn.Partitioned)),
                  strict=True):
    assert a.names == b.names
    np.testing.assert_array_equal(a.value, b.value)
  np.testing.assert_allclose(make(impl).apply(plain, x), make("xla").apply(plain, x),
                             rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_sr():
  """A tiny super-resolution U-Net (stem from 6 channels, strided downsampling, upsampling,
  1x1 skips, attention) with random parameters of nonzero output, and its inputs."""
  config = TINY_SR
  inputs = random_inputs(config, jax.random.key(0))
  shapes = jax.eval_shape(unet.UNet(config).init, jax.random.key(0), **inputs)["params"]
  return config, random_params(nn.unbox(shapes), jax.random.key(1)), inputs


def test_unet_output_and_gradient_equal_with_either_conv_impl(tiny_sr, impl="matmul"):
  config, params, inputs = tiny_sr

  def loss(p, conv_impl):
    model = unet.UNet(dataclasses.replace(config, conv_impl=conv_impl))
    out = model.apply({"params": p}, **inputs)
    return jnp.sum(jnp.sin(out)), out

  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  (g_plain, out_plain), (g_fast, out_fast) = grad(params, "xla"), grad(params, impl)
  assert float(jnp.std(out_plain)) > 0.1
  np.testing.assert_allclose(out_fast, out_plain, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_config_field_is_translated_and_checked():
  c = common.get_config()
  assert builders.unet_config(c).conv_impl == c.model.conv_impl
  with c.unlocked():
    c.model.conv_impl = "fft"
  with pytest.raises(builders.ConfigError, match="conv_impl='fft'"):
    builders.unet_config(c)
  with c.unlocked():
    del c.model["conv_impl"]  # a config stored before the field existed
  assert builders.unet_config(c).conv_impl == "xla"
