"""Flax CLIP: parity with transformers' PyTorch CLIPModel on tiny random checkpoints (both
activation functions, both end-of-text pooling rules), saving in the HF layout, the
noise-aware tower, sharding, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diffusion_jax.models import clip as clip_lib  # noqa: E402

PROMPTS = ["a red circle", "two blue squares above a star", "", "zq!"]


def _hf_config(hidden_act, eos_token_id, vocab_size):
  text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=12, hidden_act=hidden_act,
              bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1)
  vision = dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                num_attention_heads=5, image_size=16, patch_size=4, hidden_act=hidden_act)
  return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


@pytest.fixture(scope="module")
def tokenizer():
  return clip_lib.train_tokenizer(["a red circle", "two blue squares above a star"], 300)


def _checkpoint(directory, tokenizer, hidden_act, eos_token_id, seed=0):
  torch.manual_seed(seed)
  model = transformers.CLIPModel(_hf_config(hidden_act, eos_token_id, len(tokenizer))).eval()
  with torch.no_grad():  # Non-trivial norms and biases, so that a swapped tensor shows.
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  return model


def _torch_features(model, pixels_nhwc, tokens, mask):
  with torch.no_grad():
    pixel_values = torch.tensor(np.asarray(pixels_nhwc).transpose(0, 3, 1, 2))
    image = model.get_image_features(pixel_values=pixel_values)
    text = model.get_text_features(input_ids=torch.tensor(tokens, dtype=torch.long),
                                   attention_mask=torch.tensor(mask, dtype=torch.long))
  pooled = lambda o: (o.pooler_output if hasattr(o, "pooler_output") else o).numpy()  # noqa
  return pooled(image), pooled(text)


@pytest.mark.parametrize("hidden_act,eos_token_id", [("quick_gelu", 1), ("gelu", 2)])
def test_parity_with_transformers(tmp_path, tokenizer, hidden_act, eos_token_id):
  model = _checkpoint(tmp_path, tokenizer, hidden_act, eos_token_id)
  clip = clip_lib.load(tmp_path)
  assert clip.config.text.hidden_act == hidden_act and clip.config.projection_dim == 24
  tokens, mask = clip.tokenize(PROMPTS)
  assert tokens.shape == (4, 12) and tokens[2, :2].tolist() == [0, 1]  # "" = BOS EOS
  pixels = np.random.default_rng(0).standard_normal((3, 16, 16, 3)).astype(np.float32)
  ref_image, ref_text = _torch_features(model, pixels, tokens, mask)
  apply = lambda method, *a: clip.module.apply({"params": clip.params}, *a,  # noqa: E731
                                               method=method)
  image = apply(clip_lib.CLIPModel.encode_image, pixels)
  text = apply(clip_lib.CLIPModel.encode_text, tokens, mask)
  assert image.shape == (3, 24) and text.shape == (4, 24)
  np.testing.assert_allclose(image, ref_image, atol=1e-4, rtol=0)
  np.testing.assert_allclose(text, ref_text, atol=1e-4, rtol=0)
  np.testing.assert_allclose(clip.params["logit_scale"], model.logit_scale.item(), rtol=1e-6)


def test_saved_model_loads_in_transformers_and_back(tmp_path, tokenizer):
  _checkpoint(tmp_path / "hf", tokenizer, "quick_gelu", 1)
  clip = clip_lib.load(tmp_path / "hf")
  params = jax.tree.map(lambda p: p + 0.01, clip.params)  # "trained" params
  clip_lib.save(clip, tmp_path / "ours", params)
  again = clip_lib.load(tmp_path / "ours")
  jax.tree.map(np.testing.assert_array_equal, again.params, params)
  assert again.image_mean == clip_lib.OPENAI_MEAN
  model = transformers.CLIPModel.from_pretrained(tmp_path / "ours").eval()
  tokens, mask = again.tokenize(PROMPTS[:2])
  images = jnp.linspace(-1, 1, 2 * 16 * 16 * 3).reshape(2, 16, 16, 3)
  ref_image, ref_text = _torch_features(model, again.preprocess(images), tokens, mask)
  np.testing.assert_allclose(again.image_embeddings(again.params, images),
                             ref_image / np.linalg.norm(ref_image, axis=1, keepdims=True),
                             atol=1e-5)
  np.testing.assert_allclose(again.encode_prompts(PROMPTS[:2]),
                             ref_text / np.linalg.norm(ref_text, axis=1, keepdims=True),
                             atol=1e-5)


def test_noise_aware_tower_depends_on_logsnr_and_round_trips(tmp_path, tokenizer):
  text = clip_lib.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, vocab_size=len(tokenizer),
                                 max_position_embeddings=8, eos_token_id=1)
  vision = clip_lib.CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     image_size=8, patch_size=4, noise_aware=True,
                                     noise_features=8)
  module = clip_lib.CLIPModel(clip_lib.CLIPConfig(text, vision, projection_dim=8))
  images = jnp.zeros((2, 8, 8, 3))
  params = jax.jit(module.init)(jax.random.key(0), images, jnp.zeros((2, 8), jnp.int32),
                       jnp.ones((2, 8), bool), jnp.zeros(2))["params"]
  clip = clip_lib.CLIP(module, params, tokenizer, (0.5,) * 3, (0.5,) * 3)
  emb = jax.jit(clip.image_embeddings)(params, images, jnp.array([-5.0, 5.0]))
  assert emb.shape == (2, 8)
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  assert float(jnp.abs(emb[0] - emb[1]).max()) > 1e-3  # Same image, other noise level.
  clip_lib.save(clip, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["vision_config"]["noise_aware"] is True
  again = clip_lib.load(tmp_path)
  assert again.noise_aware and again.image_mean == (0.5,) * 3
  np.testing.assert_array_equal(jax.jit(again.image_embeddings)(
      again.params, images, jnp.array([-5.0, 5.0])), emb)


def test_sharded_load_matches(tmp_path, tokenizer):
  from jax.sharding import Mesh
  _checkpoint(tmp_path, tokenizer, "quick_gelu", 1)
  plain = clip_lib.load(tmp_path)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  sharded = clip_lib.load(tmp_path, mesh=mesh)
  leaf = sharded.params["text_model"]["layer_0"]["fc1"]["kernel"]
  assert leaf.sharding.mesh.shape == {"data": 1}
  jax.tree.map(np.testing.assert_array_equal, sharded.params, plain.params)


def test_wrong_model_type_is_one_clear_error(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match=r"^config.json has model_type 'bert', not 'clip': "
                                       r"this is not a CLIPModel checkpoint"):
    clip_lib.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    clip_lib.load(tmp_path / "missing")


def test_every_shapes_caption_word_is_one_token(tokenizer):
  from diffusion_jax.data import shapes
  captions = [shapes.make_example(0, "train", i, 8)[1] for i in range(200)]
  tok = clip_lib.train_tokenizer(captions)
  for caption in captions[:50]:
    ids = tok(caption)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 1 and 1 not in ids[1:-1]
    assert len(ids) == len(caption.replace(",", " ,").split()) + 2, caption
