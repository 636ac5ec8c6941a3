"""Prompt-to-Prompt: the CrossAttention edit hook, word-swap token alignment, and joint
source / target sampling on a tiny random U-Net."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import ByT5Tokenizer

from diffusion_jax import cascade
from diffusion_jax.diffusion import grids, samplers, schedules
from diffusion_jax.editing import prompt_to_prompt as p2p
from diffusion_jax.models import layers
from diffusion_jax.models import unet as unet_lib

LENGTH, WIDTH = 8, 16
CONFIG = unet_lib.UNetConfig(
    levels=(unet_lib.Level(1, 1, False, True), unet_lib.Level(2, 1, True, True)),
    base_channels=8, num_heads=2, resolution=8, text_width=WIDTH, text_length=LENGTH)


@pytest.fixture(scope="module")
def net():
  model = unet_lib.UNet(CONFIG)
  # Zero-initialised output projections would make every attention layer the identity:
  # random params throughout (only their shapes come from init), so the maps matter.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             **unet_lib.example_inputs(CONFIG, 1)))
  leaves, tree = jax.tree.flatten(nn.unbox(shapes["params"]))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves, strict=True)])
  return cascade.stage_model_fn(model, params)


def _text(seed, batch=2):
  emb = jax.random.normal(jax.random.key(seed), (batch, LENGTH, WIDTH))
  mask = jnp.arange(LENGTH)[None, :] < jnp.array([5, 7])[:batch, None]
  return {"text_emb": emb * mask[..., None], "text_mask": mask}


def test_cross_attention_edit_hook():
  module = layers.CrossAttention(2, 4)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  context = jax.random.normal(jax.random.key(1), (2, 5, 8))
  mask = jnp.array([[True] * 5, [True, True, False, False, False]])
  variables = jax.jit(module.init)(jax.random.key(2), x, context, mask)
  variables = jax.tree.map(lambda v: v + 0.5, variables)  # a non-zero output projection
  apply = jax.jit(module.apply, static_argnames="attention_edit")
  plain = apply(variables, x, context, mask)
  same = apply(variables, x, context, mask, attention_edit=lambda p: p)
  np.testing.assert_allclose(same, plain, rtol=1e-5, atol=1e-5)
  seen = []

  def only_null(p):
    seen.append(p)
    return jnp.zeros_like(p).at[..., 0].set(1.0)

  edited = module.apply(variables, x, context, mask, attention_edit=only_null)  # eager: seen
  probs = seen[0]
  assert probs.shape == (2, 2, 16, 6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(probs[1, :, :, 3:], 0.0)  # masked tokens
  assert float(jnp.abs(edited - plain).max()) > 1e-2
  # Every row attending only to the null token: the text no longer matters.
  other = apply(variables, x, context * 3.0, mask, attention_edit=only_null)
  np.testing.assert_allclose(other, edited, rtol=1e-6)


def test_word_swap_map_aligns_words_of_other_lengths():
  tok = ByT5Tokenizer()
  m = p2p.word_swap_map(tok, "a red dot", "a blue dot", max_length=16)
  # bytes: "a"=0, " "=1, "red"=2..4 (+spaces are in the next word's span), "</s>" last
  src_spans, _, src_len = p2p._word_spans(tok, "a red dot")
  tgt_spans, _, tgt_len = p2p._word_spans(tok, "a blue dot")
  assert (src_len, tgt_len) == (10, 11)
  (s0, s1), (t0, t1) = src_spans[1], tgt_spans[1]
  assert (s1 - s0, t1 - t0) == (4, 5)  # " red", " blue"
  np.testing.assert_allclose(m[1 + t0:1 + t1, 1 + s0:1 + s1], 1 / 5)
  # "dot" and </s> token by token, shifted by one; the null key to itself
  for i, j in ((s1 + k, t1 + k) for k in range(src_len - s1)):
    assert m[1 + j, 1 + i] == 1.0 and m[1 + j].sum() == 1.0
  assert m[0, 0] == 1.0
  np.testing.assert_allclose(m.sum(0)[:1 + src_len], 1.0)  # every source token's mass kept
  assert m[1 + tgt_len:].sum() == 0.0  # padding keys get nothing
  with pytest.raises(ValueError, match="same number of words"):
    p2p.word_swap_map(tok, "a red dot", "a dot", 16)
  w = p2p.word_weights(tok, "a blue dot", {"blue": 2.0}, 16)
  np.testing.assert_array_equal(w[1 + t0:1 + t1], 2.0)
  assert w.sum() == 17 + 5.0
  with pytest.raises(ValueError, match="not a word"):
    p2p.word_weights(tok, "a blue dot", {"green": 2.0}, 16)


GRID = grids.uniform_time(schedules.get("cosine"), 4)


def _sample(model_fn, keys, batch):
  grid = GRID
  x_T = samplers.initial_noise(keys, (batch, 8, 8, 3))
  return samplers.ddim(model_fn, x_T, grid, keys, parameterization="v")


@pytest.mark.parametrize("scale", [3.0, pytest.param(1.0, marks=pytest.mark.slow)])
def test_joint_sampling_with_identical_prompts_reproduces_the_plain_sample(net, scale):
  from diffusion_jax.diffusion import guidance

  cond = _text(3)
  null = {"text_emb": jnp.zeros((LENGTH, WIDTH)), "text_mask": jnp.zeros((LENGTH,), bool)}
  key = jax.random.key(7)
  plain_fn = (functools.partial(net, cond=cond) if scale == 1.0 else
              guidance.classifier_free(net, cond, null, scale))
  plain = jax.jit(lambda: _sample(lambda x, lam: plain_fn(x, lam), samplers.image_keys(key, 2),
                                  2))()
  control = p2p.identity_control(4, LENGTH + 1)
  control["offset"][2:] = 2
  control["replace_until"][2:] = np.inf  # every step, every layer
  joint_fn = p2p.joint_model_fn(net, cond, cond, null, control, scale)
  joint = jax.jit(lambda: _sample(joint_fn, p2p.paired_keys(key, 2), 4))()
  np.testing.assert_allclose(joint[:2], plain, atol=2e-4)
  np.testing.assert_allclose(joint[2:], plain, atol=2e-4)


@pytest.mark.slow
def test_word_swap_keeps_the_source_and_injects_its_maps_into_the_target(net):
  source, target = _text(3), _text(4)
  null = {"text_emb": jnp.zeros((LENGTH, WIDTH)), "text_mask": jnp.zeros((LENGTH,), bool)}
  key = jax.random.key(7)
  plain_source, plain_target = (jax.jit(lambda c: _sample(
      lambda x, lam: net(x, lam, c), samplers.image_keys(key, 2), 2))(c) for c in (source, target))

  def joint(replace_until):
    control = p2p.identity_control(4, LENGTH + 1)
    control["offset"][2:] = 2
    control["replace_until"][2:] = replace_until
    return jax.jit(lambda: _sample(p2p.joint_model_fn(net, source, target, null, control),
                                   p2p.paired_keys(key, 2), 4))()

  never, always = joint(-np.inf), joint(np.inf)
  np.testing.assert_allclose(never[:2], plain_source, atol=2e-4)
  np.testing.assert_allclose(never[2:], plain_target, atol=2e-4)  # no replacement
  np.testing.assert_allclose(always[:2], plain_source, atol=2e-4)  # the source is untouched
  # Injected maps move the target away from its own sample, far beyond the rounding
  # differences of the joint batch (and it stays its own image: the values still come
  # from the target's text). Measured on this random net: 5e-3 against a floor of ~1e-4.
  floor = float(jnp.abs(never[2:] - plain_target).max())
  assert float(jnp.abs(always[2:] - plain_target).max()) > 10 * max(floor, 1e-5)
  assert float(jnp.abs(always[2:] - plain_source).max()) > 10 * max(floor, 1e-5)
