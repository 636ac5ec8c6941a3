"""The safetensors reader: lazy shard reads through safetensors.safe_open (BF16 included)
equal the transformed whole tensor, read only their bounding box, and a corrupt file is
reported with its path."""

import itertools

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from diffusion_jax.models import hf_checkpoint

D, H, K = 6, 4, 3
TRANSFORMS = {  # the T5 / BERT families' layouts (t5.py, bert.py param_sources)
    "qkv": lambda w: w.T.reshape(D, H, K),
    "out": lambda w: w.T.reshape(H, K, D),
    "linear": lambda w: w.T,
    "identity": lambda w: w,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  directory = tmp_path_factory.mktemp("st")
  rng = np.random.default_rng(0)
  qkv = rng.standard_normal((H * K, D)).astype(np.float32)
  save_file({"q": qkv.astype(ml_dtypes.bfloat16), "o": qkv.T.copy()},
            str(directory / "a.safetensors"))
  save_file({"b": rng.standard_normal(5).astype(np.float16), "s": np.array(2.5, np.float32)},
            str(directory / "b.safetensors"))
  return directory, {"q": qkv.astype(ml_dtypes.bfloat16), "o": qkv.T.copy()}


def _slices(n, parts):
  step = n // parts
  return [slice(i * step, (i + 1) * step) for i in range(parts)]


class _Recorder:
  def __init__(self, inner):
    self.inner, self.keys = inner, []

  def __getitem__(self, key):
    self.keys.append(key)
    return self.inner[key]


def test_shards_equal_the_transformed_tensor_and_read_only_their_box(files):
  directory, arrays = files
  reader = hf_checkpoint.SafetensorsReader([directory / "a.safetensors",
                                            directory / "b.safetensors"])
  assert sorted(reader) == ["b", "o", "q", "s"]
  assert reader["q"].read(TRANSFORMS["identity"]).dtype == ml_dtypes.bfloat16
  for name, transform in (("q", "qkv"), ("o", "out"), ("q", "linear"), ("o", "identity")):
    fn = TRANSFORMS[transform]
    whole = fn(arrays[name])
    tensor = reader[name]
    assert tensor.transformed_shape(fn) == whole.shape
    np.testing.assert_array_equal(tensor.read(fn), whole)
    # Every shard of a 2-way split of any one axis, and of two axes at once.
    for axes in itertools.chain(itertools.combinations(range(whole.ndim), 1),
                                itertools.combinations(range(whole.ndim), 2)):
      choices = [_slices(whole.shape[a], 2) if a in axes and whole.shape[a] % 2 == 0
                 else [slice(None)] for a in range(whole.ndim)]
      for index in itertools.product(*choices):
        tensor._slice = recorder = _Recorder(tensor._slice)
        np.testing.assert_array_equal(tensor.read(fn, index), whole[index])
        (box,) = recorder.keys
        box_size = np.prod([len(range(*b.indices(n))) for b, n in zip(box, tensor.shape,
                                                                      strict=True)])
        assert box_size <= whole.size // 2 or all(i == slice(None) for i in index), box
        tensor._slice = recorder.inner
  # The heads shard of q's kernel [D, H, K] is one contiguous block of file rows.
  tensor = reader["q"]
  tensor._slice = recorder = _Recorder(tensor._slice)
  tensor.read(TRANSFORMS["qkv"], (slice(None), slice(2, 4), slice(None)))
  assert recorder.keys == [(slice(2 * K, 4 * K), slice(0, D))]
  np.testing.assert_array_equal(reader["s"].read(lambda x: x), np.float32(2.5))
  assert reader["b"].read(lambda x: x, (slice(1, 3),)).dtype == np.float16


def test_a_corrupt_file_is_reported_with_its_path(files, tmp_path):
  directory, _ = files
  broken = tmp_path / "model.safetensors"
  broken.write_bytes((directory / "a.safetensors").read_bytes()[:40])
  with pytest.raises(ValueError, match=f"{broken} is not a readable safetensors file: "):
    hf_checkpoint.SafetensorsReader([broken])
  data = (directory / "a.safetensors").read_bytes()
  broken.write_bytes(data[:-8])  # the header is intact, the last tensor's data is cut
  with pytest.raises(ValueError, match=f"(not a readable safetensors file|Reading . from "
                                       f"{broken} failed)"):
    reader = hf_checkpoint.SafetensorsReader([broken])
    for name in reader:
      reader[name].read(lambda x: x)
