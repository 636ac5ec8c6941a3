"""TextEncoder (offline T5) and the on-disk EmbeddingCache."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models.t5 import T5Config
from diffusion_jax.text import EmbeddingCache, TextEncoder, offline_t5_config

LENGTH = 16  # Short, to keep compiles small; the default (128) is checked once below.


@pytest.fixture(scope="module")
def encoder():
  return TextEncoder.from_pretrained("t5-offline", max_length=LENGTH)


def test_offline_shapes_mask_and_null_prompt(encoder):
  embeddings, mask = encoder.encode(["a red circle", ""])
  assert embeddings.shape == (2, LENGTH, 256) and embeddings.dtype == np.float32
  assert mask.dtype == bool
  # ByT5: one id per byte plus </s>; "" is just </s> (the null condition).
  np.testing.assert_array_equal(mask.sum(axis=1), [len("a red circle") + 1, 1])
  assert np.all(embeddings[~mask] == 0) and np.all(np.isfinite(embeddings))
  assert np.abs(embeddings[mask]).mean() > 0.1  # Not degenerate.


def test_default_max_length_is_128():
  config = offline_t5_config()
  assert (config.d_model, config.num_layers, config.num_heads, config.feed_forward_proj) == (
      256, 4, 4, "gated-gelu")
  tokens, mask = TextEncoder.from_pretrained().tokenize(["x"])
  assert tokens.shape == mask.shape == (1, 128)


def test_offline_is_deterministic_in_seed(encoder):
  again = TextEncoder.from_pretrained("t5-offline", max_length=LENGTH)
  other = TextEncoder.from_pretrained("t5-offline", max_length=LENGTH, seed=1)
  for a, b, c in zip(*map(jax.tree.leaves, (encoder.params, again.params, other.params)),
                     strict=True):
    np.testing.assert_array_equal(a, b)
    assert a.shape == c.shape and (a.ndim == 1 or not np.allclose(a, c))
  assert encoder.encoder_id == again.encoder_id != other.encoder_id


def test_batch_composition_does_not_change_a_prompt(encoder):
  alone, _ = encoder.encode(["a blue square"])
  together, _ = encoder.encode(["x", "a blue square", ""])
  np.testing.assert_allclose(together[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("prompts, message", [
    ([], "prompts is empty"),
    (["ok", 3], r"prompts\[1\] is int"),
    (["ok", None], r"prompts\[1\] is NoneType"),
    ("a single string", "got a single string"),
])
def test_bad_prompts(encoder, prompts, message):
  with pytest.raises(ValueError, match=message):
    encoder.encode(prompts)


def test_truncation_warns_once():
  encoder = TextEncoder.from_pretrained("t5-offline", max_length=LENGTH)
  long = "x" * 100
  with pytest.warns(UserWarning, match="1 prompt.* longer than max_length=16"):
    _, mask = encoder.encode([long, "short"])
  assert mask[0].all()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    encoder.encode([long])  # Second time: silent.


def test_frozen_vs_trainable_gradients():
  # A one-layer config keeps the backward-pass compile short.
  tiny = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                  feed_forward_proj="gated-gelu")
  frozen_encoder = TextEncoder.offline(config=tiny, max_length=8)
  trainable = TextEncoder.offline(config=tiny, max_length=8, trainable=True)
  assert trainable.trainable and not frozen_encoder.trainable
  tokens, mask = frozen_encoder.tokenize(["a red circle"])
  loss = lambda enc: jax.jit(jax.grad(lambda p: jnp.sum(enc.apply(p, tokens, mask) ** 2)))
  frozen = loss(frozen_encoder)(frozen_encoder.params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(frozen))
  grads = loss(trainable)(trainable.params)
  assert float(jnp.abs(grads["block_0"]["mlp"]["wo"]["kernel"]).max()) > 0


def test_encoder_id_depends_on_dtype(encoder):
  low = TextEncoder.from_pretrained("t5-offline", max_length=LENGTH, dtype=jnp.bfloat16)
  assert low.encoder_id != encoder.encoder_id and "bfloat16" in low.encoder_id


# --- EmbeddingCache ---

CAPTIONS = ["a red circle", "", "blue squares", "a red circle"]


def test_cache_hit_is_identical_and_skips_the_encoder(encoder, tmp_path, monkeypatch):
  cache = EmbeddingCache(tmp_path, encoder, batch_size=4)
  first, first_mask = cache.encode_cached(CAPTIONS)
  direct, direct_mask = encoder.encode(CAPTIONS)
  np.testing.assert_allclose(first, direct, atol=1e-5)
  np.testing.assert_array_equal(first_mask, direct_mask)
  assert (cache.hits, cache.misses) == (0, 3)  # The repeated caption is encoded once.

  def fail(prompts):
    raise AssertionError(f"encoder called for {prompts}")
  monkeypatch.setattr(encoder, "encode", fail)
  reader = EmbeddingCache(tmp_path, encoder)
  second, second_mask = reader.encode_cached(CAPTIONS)
  assert (reader.hits, reader.misses) == (4, 0)
  np.testing.assert_array_equal(second, first)
  np.testing.assert_array_equal(second_mask, first_mask)
  assert not list(tmp_path.rglob(".tmp-*"))  # Atomic writes leave no temporaries.


def test_cache_encodes_only_misses(encoder, tmp_path, monkeypatch):
  cache = EmbeddingCache(tmp_path, encoder, batch_size=8)
  cache.encode_cached(["one", "two"])
  seen = []
  original = encoder.encode
  monkeypatch.setattr(encoder, "encode", lambda prompts: seen.append(prompts) or
                      original(prompts))
  cache.encode_cached(["one", "three", "two"])
  assert [p for p in seen[0] if p] == ["three"]  # Padded to a small bucket with "".
  assert cache.precompute(["one", "four", "five", "four"]) == 2
  assert cache.precompute([]) == 0


def test_cache_key_depends_on_encoder_and_length(encoder, tmp_path):
  other_length = TextEncoder.from_pretrained("t5-offline", max_length=8)
  keys = {EmbeddingCache(tmp_path, e).key("cat") for e in (encoder, other_length)}
  assert len(keys) == 2 and EmbeddingCache(tmp_path, encoder).key("dog") not in keys


def test_corrupt_entry_is_recomputed_with_a_warning(encoder, tmp_path):
  good, _ = EmbeddingCache(tmp_path, encoder).encode_cached(["a red circle"])
  EmbeddingCache(tmp_path, encoder).path("a red circle").write_bytes(b"truncated garbage")
  with pytest.warns(UserWarning, match="unreadable .*recomputing"):
    again, _ = EmbeddingCache(tmp_path, encoder).encode_cached(["a red circle"])
  np.testing.assert_allclose(again, good, atol=1e-6)
  reader = EmbeddingCache(tmp_path, encoder)
  third, _ = reader.encode_cached(["a red circle"])  # Repaired on disk.
  np.testing.assert_array_equal(third, again)
  assert (reader.hits, reader.misses) == (1, 0)


def test_each_entry_is_read_from_disk_once_then_from_memory(encoder, tmp_path):
  EmbeddingCache(tmp_path, encoder).precompute(["one", "two", "three"])
  cache = EmbeddingCache(tmp_path, encoder)
  first, first_mask = cache.encode_cached(["one", "two"])
  for caption in ("one", "two"):
    cache.path(caption).unlink()  # Gone from disk: only memory can answer now.
  second, second_mask = cache.encode_cached(["two", "one"])
  np.testing.assert_array_equal(second, first[::-1])
  np.testing.assert_array_equal(second_mask, first_mask[::-1])
  assert (cache.hits, cache.misses) == (4, 0)
  # Precomputed entries stay in memory too.
  filled = EmbeddingCache(tmp_path / "other", encoder)
  assert filled.precompute(["four"]) == 1
  filled.path("four").unlink()
  assert filled.lookup("four") is not None
  # Beyond memory_bytes the oldest entries are dropped (and read from disk again).
  one_entry = sum(a.nbytes for a in cache._memory["one"])
  small = EmbeddingCache(tmp_path, encoder, memory_bytes=int(1.5 * one_entry))
  three, three_mask = small.encode_cached(["three"])
  small.precompute(["five"])  # New: encoded, remembered; "three" is dropped.
  assert list(small._memory) == ["five"]
  # "three" comes back from its file (a hit, not re-encoded: it is in no memory) and is
  # remembered again, dropping "five" in turn.
  assert small.path("three").is_file() and (small.hits, small.misses) == (1, 1)
  again, again_mask = small.encode_cached(["three"])
  assert (small.hits, small.misses) == (2, 1)
  assert list(small._memory) == ["three"]
  np.testing.assert_array_equal(again, three)
  np.testing.assert_array_equal(again_mask, three_mask)


def test_cache_rejects_trainable_encoders_and_bad_captions(encoder, tmp_path):
  trainable = TextEncoder.from_pretrained("t5-offline", max_length=LENGTH, trainable=True)
  with pytest.raises(ValueError, match="frozen encoder"):
    EmbeddingCache(tmp_path, trainable)
  with pytest.raises(ValueError, match="prompts is empty"):
    EmbeddingCache(tmp_path, encoder).encode_cached([])
  with pytest.raises(ValueError, match=r"prompts\[0\] is bytes"):
    EmbeddingCache(tmp_path, encoder).encode_cached([b"bytes"])
