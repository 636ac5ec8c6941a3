"""Textual inversion: placeholder rows in the T5 / MiniLM tables, training that changes
only them, and the diffusers file format (checked with diffusers' own loader)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax import text as text_lib
from diffusion_jax.editing import textual_inversion as ti
from diffusion_jax.models import t5

LENGTH = 16


@pytest.fixture(scope="module")
def t5_encoder():
  return text_lib.TextEncoder.offline(max_length=LENGTH)


@pytest.fixture(scope="module")
def tiny_t5():
  # (t5-offline's architecture at width 32 and one layer: the training test compiles the
  # gradient through encoder and U-Net, which at width 256 took minutes on 2 busy cores.)
  return text_lib.TextEncoder.offline(max_length=LENGTH, config=t5.T5Config(
      vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
      feed_forward_proj="gated-gelu"))


def _toy_net(x_t, logsnr, cond):
  """A stand-in for the frozen U-Net whose output depends on every text position (the
  real U-Net path runs in test_edit_cli's slow end-to-end test; its jitted init alone
  compiles for minutes on 2 busy cores)."""
  pooled = (cond["text_emb"] * cond["text_mask"][..., None]).mean(axis=(1, 2))
  return jnp.tanh(x_t * pooled[:, None, None, None] + logsnr[:, None, None, None])


def test_add_tokens_adds_rows_and_keeps_the_others(t5_encoder):
  new, ids = ti.add_tokens(t5_encoder, "<s*>", num_vectors=2, init_word="dot")
  assert ids.tolist() == [384, 385]
  old_table = np.asarray(t5_encoder.params["shared"]["embedding"])
  table = np.asarray(new.params["shared"]["embedding"])
  np.testing.assert_array_equal(table[:384], old_table)
  np.testing.assert_allclose(table[384], old_table[[ord(c) + 3 for c in "dot"]].mean(0))
  tokens, _ = new.tokenize(["a <s*> <s*>_1"])
  assert 384 in tokens[0] and 385 in tokens[0]
  emb, mask = new.encode(["a pic of <s*>"])
  assert emb.shape == (1, LENGTH, 256) and np.isfinite(emb).all()
  assert new.encoder_id != t5_encoder.encoder_id
  with pytest.raises(ValueError, match="already in the tokenizer"):
    ti.add_tokens(new, "<s*>")
  with pytest.raises(ValueError, match="one non-empty word"):
    ti.add_tokens(t5_encoder, "two words")


def test_training_changes_only_the_new_rows_and_the_file_round_trips(tiny_t5, tmp_path):
  encoder, ids = ti.add_tokens(tiny_t5, "<s*>")
  images = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3), minval=-1, maxval=1)
  trained, history = ti.train(encoder, _toy_net, ids, np.asarray(images),
                              ["a pic of <s*>"], jax.random.key(2), num_steps=3,
                              batch_size=2)
  assert len(history) == 3 and np.isfinite(history).all()
  before = traverse_util.flatten_dict(encoder.params)
  after = traverse_util.flatten_dict(trained.params)
  for path, value in before.items():
    if path == ("shared", "embedding"):
      changed = np.any(np.asarray(after[path]) != np.asarray(value), axis=1)
      assert np.flatnonzero(changed).tolist() == ids.tolist()
    else:
      np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(value))
  vectors = np.asarray(trained.params["shared"]["embedding"])[ids]
  path = tmp_path / "learned_embeds.safetensors"
  ti.save_embedding(path, "<s*>", vectors)
  loaded, names = ti.load_embedding(tiny_t5, path)
  assert names == ["<s*>"]
  np.testing.assert_array_equal(loaded.encode(["a pic of <s*>"])[0],
                                trained.encode(["a pic of <s*>"])[0])
  with pytest.raises(ValueError, match="placeholder token"):
    ti.train(encoder, _toy_net, ids, np.asarray(images), ["a pic"],
             jax.random.key(2), num_steps=1)


def test_file_errors(t5_encoder, tmp_path):
  from safetensors.numpy import save_file

  with pytest.raises(FileNotFoundError):
    ti.load_embedding(t5_encoder, tmp_path / "missing.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="not a readable safetensors"):
    ti.load_embedding(t5_encoder, tmp_path / "junk.safetensors")
  save_file({"<a>": np.zeros(384, np.float32)}, str(tmp_path / "wide.safetensors"))
  with pytest.raises(ValueError, match="does not fit this text encoder"):
    ti.load_embedding(t5_encoder, tmp_path / "wide.safetensors")
  save_file({"<a>": np.zeros(256, np.float32), "<b>": np.zeros(256, np.float32)},
            str(tmp_path / "two.safetensors"))
  with pytest.raises(ValueError, match="exactly one"):
    ti.load_embedding(t5_encoder, tmp_path / "two.safetensors")


@pytest.mark.slow  # importing torch + diffusers alone takes ~30 s on a busy machine
def test_diffusers_loader_reads_the_saved_file(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  import transformers
  from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

  vectors = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
  ti.save_embedding(tmp_path / "learned_embeds.safetensors", "<cat-toy>", vectors)
  tokenizer = transformers.ByT5Tokenizer()
  text_encoder = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))

  class Pipeline(TextualInversionLoaderMixin):
    hf_device_map, components = None, {}

  Pipeline().load_textual_inversion(str(tmp_path), tokenizer=tokenizer,
                                    text_encoder=text_encoder)
  table = text_encoder.get_input_embeddings().weight.detach().numpy()
  for name, vector in zip(ti.token_names("<cat-toy>", 2), vectors, strict=True):
    np.testing.assert_array_equal(table[tokenizer.convert_tokens_to_ids(name)], vector)
  del torch


def test_minilm_encoder_takes_a_placeholder():
  try:
    encoder = text_lib.TextEncoder.from_pretrained(text_lib.MINILM_ID, max_length=LENGTH)
  except FileNotFoundError as e:
    pytest.skip(str(e))
  new, ids = ti.add_tokens(encoder, "<s*>", init_word="shape")
  table = np.asarray(new.params["word_embeddings"]["embedding"])
  np.testing.assert_array_equal(table[:-1], np.asarray(
      encoder.params["word_embeddings"]["embedding"]))
  tokens, _ = new.tokenize(["a pic of <s*>"])
  assert int(ids[0]) in tokens[0].tolist()
  emb = jnp.asarray(new.encode(["a pic of <s*>"])[0])
  assert emb.shape == (1, LENGTH, 384) and bool(jnp.isfinite(emb).all())
