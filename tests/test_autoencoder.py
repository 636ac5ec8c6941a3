"""The Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL (a test-only reference) on
tiny random models saved with ``save_pretrained``; loading errors; the posterior helpers."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import sharding
from diffusion_jax.models import autoencoder as ae

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

# Two tiny layouts: f = 4 with a width change (shortcut convs) and 2 layers per block; f = 2
# without quant convs or mid-block attention (SD3 / Flux-style switches) and a shift.
CONFIGS = [
    dict(block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=4,
         norm_num_groups=4, scaling_factor=0.3),
    dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=3, norm_num_groups=2,
         use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
         scaling_factor=1.5, shift_factor=0.25),
]


def _save_reference(directory, kwargs, seed):
  n = len(kwargs["block_out_channels"])
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                up_block_types=("UpDecoderBlock2D",) * n, **kwargs)
  with torch.no_grad():  # non-trivial norms and biases, so a swapped name cannot pass
    for p in vae.parameters():
      p.add_(0.1 * torch.randn_like(p))
  vae.eval()
  vae.save_pretrained(directory)
  return vae


@pytest.fixture(scope="module", params=range(len(CONFIGS)))
def pair(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(f"vae{request.param}")
  vae = _save_reference(directory, CONFIGS[request.param], seed=request.param)
  return vae, ae.load_diffusers(directory), directory


def test_encode_and_decode_match_diffusers(pair):
  vae, loaded, _ = pair
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
    ref_mean = posterior.mean.numpy().transpose(0, 2, 3, 1)
    ref_logvar = posterior.logvar.numpy().transpose(0, 2, 3, 1)
    z = rng.normal(size=ref_mean.shape).astype(np.float32)
    ref_decoded = vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
  model, params = loaded.model, loaded.params
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(
      params, jnp.asarray(images))
  f = loaded.config.downsample_factor
  assert mean.shape == (2, 16 // f, 16 // f, loaded.config.latent_channels)
  np.testing.assert_allclose(mean, ref_mean, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logvar, ref_logvar, atol=1e-4, rtol=1e-4)
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
  np.testing.assert_allclose(decode(params, jnp.asarray(z)),
                             ref_decoded.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)

  # scaling_factor / shift_factor come from config.json and map z <-> diffusion latents.
  cfg = vae.config
  assert (loaded.config.scaling_factor, loaded.config.shift_factor) == (
      cfg.scaling_factor, cfg.shift_factor)
  latents = jax.jit(ae.encode_fn(model, params))(jnp.asarray(images))
  np.testing.assert_allclose(latents, (ref_mean - (cfg.shift_factor or 0.0))
                             * cfg.scaling_factor, atol=1e-4, rtol=1e-4)
  decoded = jax.jit(ae.decode_fn(model, params))(to_latents := jnp.asarray(
      (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor))
  assert to_latents.shape == z.shape
  np.testing.assert_allclose(decoded, ref_decoded.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_save_diffusers_round_trips_through_diffusers(pair, tmp_path):
  vae, loaded, _ = pair
  ae.save_diffusers(tmp_path, loaded.config, loaded.params)
  again = diffusers.AutoencoderKL.from_pretrained(tmp_path)
  ours, theirs = again.state_dict(), vae.state_dict()
  assert ours.keys() == theirs.keys()
  for name in theirs:
    np.testing.assert_array_equal(ours[name].numpy(), theirs[name].numpy(), err_msg=name)
  assert again.config.scaling_factor == vae.config.scaling_factor


def test_params_shard_by_logical_names(pair):
  _, _, directory = pair
  mesh = sharding.make_mesh({"data": -1, "model": 1})
  loaded = ae.load_diffusers(directory, mesh=mesh)
  kernel = loaded.params["encoder"]["conv_in"]["kernel"]
  expected = sharding.logical_to_mesh_spec((None, None, "conv_in", "conv_out"), kernel.shape,
                                           sharding.FSDP_RULES, mesh)
  assert kernel.sharding.spec == expected
  boxed = ae.abstract_params(loaded.config)
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec))
  assert specs and all(len(s) > 0 for s in specs)  # every parameter is named


def test_missing_weights_and_foreign_config_are_one_line(tmp_path, pair):
  _, _, directory = pair
  (tmp_path / "config.json").write_text((directory / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="has no autoencoder weights"):
    ae.load_diffusers(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ae.load_diffusers(tmp_path / "nope")
  config = json.loads((directory / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, _class_name="UNet2DModel")))
  with pytest.raises(ValueError, match="not an AutoencoderKL"):
    ae.load_diffusers(tmp_path)


def test_kl_divergence_closed_form():
  mean = jnp.asarray([[0.5, -1.0]])
  logvar = jnp.asarray([[math.log(2.0), 0.0]])
  # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2 per element.
  expected = 0.5 * (0.25 + 2 - 1 - math.log(2.0)) + 0.5 * 1.0
  np.testing.assert_allclose(ae.kl_divergence(mean, logvar), [expected], rtol=1e-6)
  z = ae.posterior_sample(jax.random.key(0), jnp.zeros((20000,)), jnp.full((20000,), 2.0))
  assert abs(float(z.std()) - math.e) < 0.05
