"""The FID Inception-v3 (diffusion_jax/evaluation/inception.py) on a small random network of
the same interface: saved in the weights format and loaded back, its blocks against torch,
its features in the Frechet distance, and evaluate.py's one-line errors for --fid_weights."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import one_error_line

from diffusion_jax.data import shapes
from diffusion_jax.evaluation import frechet
from diffusion_jax.evaluation import inception as inc

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import evaluating  # noqa: E402

TINY = inc.InceptionSettings(width=1 / 16, input_size=75)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(network, its saved file, the network loaded back from that file)."""
  params = inc.init_params(TINY, seed=3)
  path = tmp_path_factory.mktemp("inception") / "tiny.npz"
  inc.save_npz(params, path, TINY)
  return inc.InceptionFeatures(params, TINY, batch_size=16), path, \
      inc.InceptionFeatures.load(path, batch_size=16)


def _images(n, seed=0, size=32):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_tiny_network_loads_back_to_identical_features(tiny):
  net, path, loaded = tiny
  assert loaded.settings == TINY and loaded.source == str(path)
  images = _images(20)
  features = net.features(images)
  assert features.shape == (20, net.feature_dim) == (20, 128)
  np.testing.assert_array_equal(loaded.features(images), features)
  assert np.isfinite(features).all() and features.std() > 0
  # One compiled batch size: a batch split over calls gives the same features.
  np.testing.assert_allclose(net.features(images[:7]), features[:7], rtol=1e-5, atol=1e-6)
  # The file is a state dict: torch's key names and layouts.
  stored = np.load(path)
  assert stored["Conv2d_1a_3x3.conv.weight"].shape == (2, 3, 3, 3)  # [O, I, kh, kw]
  assert stored["Mixed_6b.branch7x7_2.conv.weight"].shape == (8, 8, 1, 7)
  assert len([k for k in stored.files if k != inc.SETTINGS_KEY]) == 94 * 5


def test_standard_network_has_the_fid_state_dict_shapes():
  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth: 94 convolutions, these shapes.
  template = inc._template(inc.InceptionSettings())
  flat = inc._flat(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), template))
  assert len(flat) == 94 * 5
  expected = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
              "Conv2d_4a_3x3.bn.running_var": (192,),
              "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
              "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
              "Mixed_5d.branch_pool.conv.weight": (64, 288, 1, 1),
              "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
              "Mixed_6b.branch7x7_1.conv.weight": (128, 768, 1, 1),
              "Mixed_6c.branch7x7_2.conv.weight": (160, 160, 1, 7),
              "Mixed_6d.branch7x7dbl_2.conv.weight": (160, 160, 7, 1),
              "Mixed_6e.branch7x7_3.conv.weight": (192, 192, 7, 1),
              "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
              "Mixed_7b.branch_pool.conv.weight": (192, 1280, 1, 1),
              "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
              "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
              "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
              "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
              "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1)}
  for key, shape in expected.items():
    assert flat[key].shape == shape, key
  x = jax.ShapeDtypeStruct((2, 299, 299, 3), jnp.float32)
  out = jax.eval_shape(lambda p: inc.InceptionV3(inc.InceptionSettings()).apply(
      {"params": p}, x), template)
  assert out.shape == (2, 2048)
  assert inc.InceptionFeatures(None, inc.InceptionSettings()).feature_dim == 2048


# A torch reference of the blocks pytorch-fid patches, from the saved state dict.
def _t_conv(sd, name, x, stride=1, padding=(0, 0)):
  g = lambda k: torch.from_numpy(sd[f"{name}.{k}"])  # noqa: E731
  y = F.conv2d(x, g("conv.weight"), stride=stride, padding=padding)
  y = F.batch_norm(y, g("bn.running_mean"), g("bn.running_var"), g("bn.weight"),
                   g("bn.bias"), training=False, eps=1e-3)
  return F.relu(y)


def _t_block(sd, name, x):
  """torchvision's Inception-v3 block ``name`` with pytorch-fid's FID patches, in torch."""
  c = lambda n, y, **kw: _t_conv(sd, f"{name}.{n}", y, **kw)  # noqa: E731
  avg = lambda y: F.avg_pool2d(y, 3, 1, 1, count_include_pad=False)  # noqa: E731
  row, col = dict(padding=(0, 3)), dict(padding=(3, 0))
  if name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    b5 = c("branch5x5_2", c("branch5x5_1", x), padding=(2, 2))
    d = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x), padding=(1, 1)),
          padding=(1, 1))
    return torch.cat([c("branch1x1", x), b5, d, c("branch_pool", avg(x))], 1)
  if name == "Mixed_6a":
    d = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x), padding=(1, 1)),
          stride=2)
    return torch.cat([c("branch3x3", x, stride=2), d, F.max_pool2d(x, 3, 2)], 1)
  if name.startswith("Mixed_6"):
    b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x), **row), **col)
    d = c("branch7x7dbl_1", x)
    for i, pad in ((2, col), (3, row), (4, col), (5, row)):
      d = c(f"branch7x7dbl_{i}", d, **pad)
    return torch.cat([c("branch1x1", x), b7, d, c("branch_pool", avg(x))], 1)
  if name == "Mixed_7a":
    b3 = c("branch3x3_2", c("branch3x3_1", x), stride=2)
    b7 = c("branch7x7x3_3", c("branch7x7x3_2", c("branch7x7x3_1", x), **row), **col)
    return torch.cat([b3, c("branch7x7x3_4", b7, stride=2), F.max_pool2d(x, 3, 2)], 1)
  b3 = c("branch3x3_1", x)
  b3 = torch.cat([c("branch3x3_2a", b3, padding=(0, 1)), c("branch3x3_2b", b3,
                                                            padding=(1, 0))], 1)
  d = c("branch3x3dbl_2", c("branch3x3dbl_1", x), padding=(1, 1))
  d = torch.cat([c("branch3x3dbl_3a", d, padding=(0, 1)), c("branch3x3dbl_3b", d,
                                                             padding=(1, 0))], 1)
  pool = F.max_pool2d(x, 3, 1, 1) if name == "Mixed_7c" else avg(x)
  return torch.cat([c("branch1x1", x), b3, d, c("branch_pool", pool)], 1)


BLOCKS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
          "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")


def _t_features(sd, images, size):
  """pytorch-fid's forward: [0, 1] images resized bilinearly, to [-1, 1], pool3."""
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
  x = 2 * F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) - 1
  x = _t_conv(sd, "Conv2d_2a_3x3", _t_conv(sd, "Conv2d_1a_3x3", x, stride=2))
  x = F.max_pool2d(_t_conv(sd, "Conv2d_2b_3x3", x, padding=(1, 1)), 3, 2)
  x = F.max_pool2d(_t_conv(sd, "Conv2d_4a_3x3", _t_conv(sd, "Conv2d_3b_1x1", x)), 3, 2)
  for name in BLOCKS:
    x = _t_block(sd, name, x)
  return x.mean((2, 3)).numpy()


def test_network_matches_torch(tiny):
  # At 139 px the last blocks see 3 x 3 maps (at 75 px, 1 x 1: every pool the identity).
  net, path, _ = tiny
  sd = dict(np.load(path))
  settings = inc.InceptionSettings(width=TINY.width, input_size=139)
  images = _images(4, seed=2, size=64)
  ours = inc.InceptionFeatures(net.params, settings, batch_size=4).features(images)
  np.testing.assert_allclose(ours, _t_features(sd, images, 139), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block,channels,size", [("Mixed_5b", 12, 9), ("Mixed_7c", 128, 5)])
def test_patched_blocks_match_torch(tiny, block, channels, size):
  # The pools pytorch-fid patches, on inputs with larger values than the network's.
  net, path, _ = tiny
  sd = dict(np.load(path))
  x = np.random.default_rng(1).normal(size=(2, size, size, channels)).astype(np.float32) * 3
  module = (inc.InceptionA(TINY, 32) if block == "Mixed_5b" else inc.InceptionE(TINY, True))
  ours = module.apply({"params": net.params[block]}, jnp.asarray(x))
  ref = _t_block(sd, block, torch.from_numpy(x.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(np.asarray(ours), ref.numpy().transpose(0, 2, 3, 1), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_input_is_resized_as_pytorch_fid_does(size):
  images = _images(2, size=size)
  ours = np.asarray(inc.to_input(images, 75))
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
  ref = 2 * F.interpolate(x, size=(75, 75), mode="bilinear", align_corners=False) - 1
  np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_real_against_real_is_closer_than_against_noise(tiny):
  net, _, _ = tiny

  def noise_sampler(prompts, first_index):
    rng = np.random.default_rng(first_index)
    return rng.integers(0, 256, (len(prompts), 32, 32, 3), dtype=np.uint8)

  fd = evaluating.fd_probe(net.features, noise_sampler, 48, 32, 3, batch_size=16,
                           fid_features=net.features)
  fid = fd["fid"]
  assert fid["feature_dim"] == 128 and fid["num_images"] == 48
  assert 0 < fid["real_vs_real_floor"] < fid["generated_vs_real"]
  # The same distances as frechet.py on the features directly.
  real = np.stack([shapes.make_example(0, "validation", i, 32, max_objects=3)[2]
                   for i in range(96)])
  a = frechet.FeatureStats().update(net.features(real[:48]))
  b = frechet.FeatureStats().update(net.features(real[48:]))
  np.testing.assert_allclose(b.frechet_distance(a), fid["real_vs_real_floor"], rtol=1e-6)


def test_wrong_files_are_one_line(tiny, tmp_path):
  _, path, _ = tiny
  with pytest.raises(inc.WeightsError, match="has shape"):
    inc.load_params(path, inc.InceptionSettings(width=1 / 8, input_size=75))
  torch_file = tmp_path / "x.pth"
  torch_file.write_bytes(b"")
  with pytest.raises(inc.WeightsError, match="convert it once"):
    inc.load_params(torch_file)
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not an npz")
  with pytest.raises(inc.WeightsError, match="not a readable .npz"):
    inc.load_params(bad)


def _evaluate(*args):
  return subprocess.run([sys.executable, str(ROOT / "experiments" / "evaluate.py"), *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("extra,message", [
    ([], "the Inception weights file {missing} does not exist: download pytorch-fid's "
     "pt_inception-2015-12-05-6726825d.pth"),
    (["--fd_images=0"], "--fid_weights={missing} needs --fd_images >= 2"),
])
def test_missing_weights_is_one_line_before_sampling(tmp_path, extra, message):
  missing = tmp_path / "pt_inception.npz"
  out = tmp_path / "out"
  error = one_error_line(_evaluate("--workdirs=/nonexistent", f"--outdir={out}",
                                   f"--fid_weights={missing}", *extra))
  assert message.format(missing=missing) in error, error
  assert not out.exists()


def test_torch_state_dict_converts_to_the_same_network(tiny, tmp_path):
  # A .pth as pytorch-fid ships it: the state dict with the classifier and BatchNorm
  # counters, which the conversion drops.
  net, path, _ = tiny
  state = {k: torch.from_numpy(v) for k, v in np.load(path).items() if k != inc.SETTINGS_KEY}
  state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 128), torch.zeros(1008)
  state["Mixed_5b.branch1x1.bn.num_batches_tracked"] = torch.tensor(0)
  pth = tmp_path / "tiny.pth"
  torch.save(state, pth)
  assert inc.convert_torch_file(pth, tmp_path / "tiny.npz", TINY) == 94 * 5 + 2 + 1
  converted = inc.InceptionFeatures.load(tmp_path / "tiny.npz", batch_size=16)
  images = _images(16, seed=5)
  np.testing.assert_array_equal(converted.features(images), net.features(images))
  with pytest.raises(inc.WeightsError, match="has shape"):  # read as the standard network
    inc.convert_torch_file(pth, tmp_path / "standard.npz")
  assert not list(tmp_path.glob("standard*"))


def test_convert_script_missing_file_is_one_line(tmp_path):
  r = subprocess.run([sys.executable, str(ROOT / "experiments" / "convert_fid_inception.py"),
                      f"--pth={tmp_path / 'none.pth'}", f"--out={tmp_path / 'w.npz'}"],
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert "does not exist; download it from https://github.com/mseitzer" in one_error_line(r)
