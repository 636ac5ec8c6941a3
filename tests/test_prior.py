"""The unCLIP diffusion prior: two training steps on tiny data stay finite and change the
params; classifier-free-guided DDIM sampling runs on vectors and gives [B, E] embeddings
(unit-norm by ``to_embedding``'s construction; an untrained prior's raw norm means nothing)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.diffusion import grids, guidance, samplers, schedules
from diffusion_jax.models import prior as prior_lib


def test_prior_trains_two_steps_and_samples_embeddings():
  config = prior_lib.PriorConfig(embed_dim=8, text_width=6, hidden_size=16,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)
  prior = prior_lib.DiffusionPrior(config)
  b, length = 4, 5
  rng = np.random.default_rng(0)
  image_emb = rng.standard_normal((b, 8)).astype(np.float32)
  image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
  cond = {"text_tokens": jnp.asarray(rng.standard_normal((b, length, 6)), jnp.float32),
          "text_mask": jnp.asarray(np.arange(length)[None] < np.array([[5], [3], [1], [4]])),
          "text_emb": jnp.asarray(image_emb[::-1].copy())}
  params = jax.jit(prior.init)(jax.random.key(0), jnp.zeros((b, 8)), jnp.zeros(b),
                               cond["text_tokens"], cond["text_mask"],
                               cond["text_emb"])["params"]
  schedule = schedules.get("cosine")
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    value, grads = jax.value_and_grad(
        lambda p: prior_lib.loss(prior, p, key, image_emb, cond, schedule))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  start = params
  for i in range(2):
    params, opt_state, value = step(params, opt_state, jax.random.key(i))
    assert np.isfinite(float(value))
  moved = jax.tree.leaves(jax.tree.map(lambda a, c: float(jnp.abs(a - c).max()), params,
                                       start))
  assert max(moved) > 0

  null = prior_lib.null_condition(config, length)
  fn = guidance.classifier_free(prior_lib.model_fn(prior, params), cond, null, 3.0)
  z = samplers.sample("ddim", fn, samplers.initial_noise(jax.random.key(1), (b, 8)),
                      grids.uniform_time(schedules.get("cosine"), 5), jax.random.key(2),
                      parameterization="x0")
  emb = prior_lib.to_embedding(z)
  assert emb.shape == (b, 8) and np.all(np.isfinite(emb))
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(prior_lib.to_prior_space(image_emb), axis=1),
                             np.sqrt(8), rtol=1e-5)
