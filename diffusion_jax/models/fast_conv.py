"""2-D convolutions written as matrix multiplications, for backends whose dot is faster
than their convolution (XLA:CPU).

XLA:CPU's dot reaches the machine's matmul peak, while its convolutions, the backward
ones above all, do not, and it wraps the weight-gradient convolutions in layout
transposes. A k x k convolution of an NHWC image is a sum over the k*k kernel taps of
the image shifted by that tap times the tap's [Cin, Cout] matrix, so it can be written
with slices and dots only:

  ``im2col``   the k*k shifted (and strided) slices of the padded image concatenated on
               the channel axis, [B, H', W', k*k*Cin], then one dot with the kernel
               reshaped to [k*k*Cin, Cout] (Chellapilla et al. 2006, "High Performance
               Convolutional Neural Networks for Document Processing");
  ``shifted``  k*k dots of the shifted slices with the taps' [Cin, Cout] matrices,
               accumulated (no k*k-times larger patch tensor);
  a 1x1 convolution is a single dot either way.

Their gradients are autodiff's: the transpose of a slice is a pad, of a concatenation a
slice, of a dot a dot, so the backward pass is dots too.

``conv_general_dilated(impl)`` returns a function with ``lax.conv_general_dilated``'s
signature that flax's ``nn.Conv(conv_general_dilated=...)`` accepts: the module, its
parameters ('kernel' [kh, kw, Cin, Cout], 'bias' [Cout]), their initialisers and logical
axis names stay nn.Conv's, so a checkpoint does not know which implementation trained it.
Anything other than an NHWC / HWIO convolution without dilation or feature groups falls
back to ``lax.conv_general_dilated``.

Measured on a 2-core Zen 5 under XLA:CPU (jax 0.10.2; benchmarks/train.py --conv_impls):
both are slower than lax.conv at the demo and bench-peer widths (32-256 channels), so
'xla' is the default. XLA:CPU's convolutions form their patches in cache, whereas here the
k*k-times larger patch tensors (and their gradients) go through memory, and XLA:CPU
transposes the operands of the kernel-gradient dot (its contraction is over positions, the
major axis). On TPU / GPU lax.conv is the one to use anyway.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

# The values of ``UNetConfig.conv_impl`` / ``config.model.conv_impl``.
IMPLS = ("xla", "matmul", "shifted")
_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # ConvDimensionNumbers of NHWC / HWIO


def _taps(padded: jnp.ndarray, kernel_hw, strides, out_hw):
  """The kh*kw shifted, strided views [B, H', W', Cin] of a padded [B, Hp, Wp, Cin], in
  the kernel's row-major tap order."""
  (kh, kw), (sh, sw), (oh, ow) = kernel_hw, strides, out_hw
  batch, _, _, channels = padded.shape
  return [lax.slice(padded, (0, i, j, 0),
                    (batch, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, channels),
                    (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, strides=(1, 1), padding="SAME",
           impl: str = "matmul", precision=None,
           preferred_element_type=None) -> jnp.ndarray:
  """2-D convolution of x [B, H, W, Cin] with kernel [kh, kw, Cin, Cout] -> [B, H', W', Cout]
  written as dots (``impl`` 'matmul': im2col, 'shifted': accumulated per-tap dots; see the
  module docstring). ``padding``: 'SAME', 'VALID' or ((lo, hi), (lo, hi)), as lax's.
  Equals ``lax.conv_general_dilated`` with NHWC / HWIO dimension numbers up to float
  rounding (the sums run in a different order)."""
  kh, kw, cin, cout = kernel.shape
  if x.shape[-1] != cin:
    raise ValueError(f"input has {x.shape[-1]} channels, kernel expects {cin}")
  strides = tuple(strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
  (plo_h, phi_h), (plo_w, phi_w) = padding
  out_h = (x.shape[1] + plo_h + phi_h - kh) // strides[0] + 1
  out_w = (x.shape[2] + plo_w + phi_w - kw) // strides[1] + 1
  dot = functools.partial(jnp.dot, precision=precision,
                          preferred_element_type=preferred_element_type)
  if (kh, kw) == (1, 1) and not any((plo_h, phi_h, plo_w, phi_w)):
    x = x[:, ::strides[0], ::strides[1], :] if strides != (1, 1) else x
    return dot(x, kernel.reshape(cin, cout))
  padded = jnp.pad(x, ((0, 0), (plo_h, phi_h), (plo_w, phi_w), (0, 0)))
  taps = _taps(padded, (kh, kw), strides, (out_h, out_w))
  if impl == "matmul":
    return dot(jnp.concatenate(taps, axis=-1), kernel.reshape(kh * kw * cin, cout))
  if impl == "shifted":
    weights = kernel.reshape(kh * kw, cin, cout)
    out = dot(taps[0], weights[0])
    for tap, weight in zip(taps[1:], weights[1:], strict=True):
      out = out + dot(tap, weight)
    return out
  raise ValueError(f"conv2d impl must be 'matmul' or 'shifted', got {impl!r}")


def conv_general_dilated(impl: str):
  """A ``lax.conv_general_dilated`` replacement for ``nn.Conv(conv_general_dilated=...)``
  that runs 2-D NHWC convolutions as ``conv2d(impl=impl)``; ``impl`` 'xla' (or anything
  ``conv2d`` does not cover) is lax's own."""
  if impl not in IMPLS:
    raise ValueError(f"conv_impl must be one of {', '.join(IMPLS)}, got {impl!r}")
  if impl == "xla":
    return lax.conv_general_dilated

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, batch_group_count=1,
           precision=None, preferred_element_type=None):
    plain = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
             and all(d == 1 for d in (lhs_dilation or (1,)))
             and all(d == 1 for d in (rhs_dilation or (1,)))
             and tuple(map(tuple, dimension_numbers or ())) == _NHWC)
    if not plain:
      return lax.conv_general_dilated(
          lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count, precision, preferred_element_type)
    return conv2d(lhs, rhs, window_strides, padding, impl, precision, preferred_element_type)

  return conv
