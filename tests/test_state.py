"""Train state: the EMA update and its warm-up in closed form, and one bf16 train step."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import training_helpers as th

from diffusion_jax.models.unet import UNet
from diffusion_jax.training import loop as loop_lib
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import step as step_lib


def test_ema_decay_warms_up_as_one_plus_step_over_ten_plus_step():
  steps = jnp.array([0, 1, 10, 90, 10_000])
  np.testing.assert_allclose(state_lib.ema_decay_at(steps, 0.99, True),
                             [1 / 10, 2 / 11, 11 / 20, 0.91, 0.99], rtol=1e-6)
  np.testing.assert_allclose(state_lib.ema_decay_at(steps, 0.99, False), [0.99] * 5)


def test_ema_update_is_the_exponential_average():
  ema = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(4.0)}
  params = {"a": jnp.array([3.0, 2.0]), "b": jnp.array(0.0)}
  out = state_lib.ema_update(ema, params, jnp.float32(0.75))
  np.testing.assert_allclose(out["a"], [0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.25 * 2])
  np.testing.assert_allclose(out["b"], 3.0)


def test_warmed_up_ema_forgets_the_initialisation_as_one_over_binomial():
  """Params held at p from e_0: e_n - p = (e_0 - p) prod_k (1 + k) / (10 + k), which
  telescopes to 1 / C(n + 9, 9) while the warm-up is below the decay; after that every step
  multiplies by the decay."""
  e0, p = jnp.float32(1.0), jnp.float32(0.0)

  def run(n, decay):
    def body(e, k):
      return state_lib.ema_update(e, p, state_lib.ema_decay_at(k, decay, True)), None
    return jax.lax.scan(body, e0, jnp.arange(n))[0]

  for n in (1, 5, 20):
    assert float(run(n, 0.9999)) == pytest.approx(1 / math.comb(n + 9, 9), rel=1e-5)
  # decay 0.9: the warm-up (1+k)/(10+k) reaches 0.9 at k = 80, then stays at 0.9.
  assert float(run(100, 0.9)) == pytest.approx(
      0.9**20 / math.comb(80 + 9, 9), rel=1e-4)


def test_a_bfloat16_train_step_is_finite_and_keeps_float32_state():
  model = UNet(dataclasses.replace(th.tiny_unet().config, dtype="bfloat16"))
  tx = state_lib.make_optimizer(state_lib.OptimizerSettings(learning_rate=1e-3,
                                                            warmup_steps=1))
  inputs = loop_lib.init_inputs(model.config, 16, None, th.TEXT_LEN, th.TEXT_DIM)
  params = nn.unbox(model.init(jax.random.key(0), **inputs)["params"])
  state = state_lib.create_train_state(params, tx, jax.random.key(1))
  null = loop_lib.encode_null(th.HashText())
  batch = loop_lib._model_batch(next(th.ShapesIterator(4)), th.HashText())
  settings = step_lib.StepSettings(step_lib.DiffusionSettings(), ema_decay=0.9)
  new, metrics = jax.jit(lambda s, b: step_lib.train_step(s, b, null, model=model, tx=tx,
                                                          settings=settings))(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
  assert float(metrics["skipped"]) == 0.0
  floats = [x for x in jax.tree.leaves((new.params, new.ema_params, new.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(params),
                                                   jax.tree.leaves(new.params), strict=True))
  # The step's EMA at step 0 is the warm-up's 1/10: ema = 0.1 ema_0 + 0.9 params_1.
  for e0, p1, e1 in zip(jax.tree.leaves(params), jax.tree.leaves(new.params),
                        jax.tree.leaves(new.ema_params), strict=True):
    np.testing.assert_allclose(e1, 0.1 * e0 + 0.9 * p1, rtol=1e-5, atol=1e-7)
