"""T5 encoder: parity with transformers' PyTorch T5EncoderModel, sharded loading, bad input.

The checkpoints are tiny random models written by ``T5EncoderModel.save_pretrained`` into
a temp dir, each with a tokenizer built offline (no hub): ByT5's byte-level tokenizer for
the v1.1 (gated-GELU) model, a word-level ``tokenizer.json`` for the v1.0 (ReLU) one, which
is also saved as a sharded ``model.safetensors.index.json``. Parity compares *all*
positions, padded ones included: both implementations compute them the same way (padded
queries attend to the valid keys), so nothing is hidden by comparing only valid tokens.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diffusion_jax.models import hf_checkpoint, t5  # noqa: E402
from diffusion_jax.text import TextEncoder  # noqa: E402

PROMPTS = ["a red circle", "", "the big blue square on the left of a small red circle that is",
           "Red circle"]
MAX_LENGTH = 12
TINY = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16)
WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "blue", "square", "the", "is",
         "that", "of", "on", "left", "right", "big", "small"]


def _word_tokenizer():
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                     special_tokens=[("</s>", 1)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              eos_token="</s>", unk_token="<unk>")


def _save_checkpoint(directory, feed_forward_proj, tokenizer, seed, **save_kwargs):
  torch.manual_seed(seed)
  config = transformers.T5Config(feed_forward_proj=feed_forward_proj, **TINY)
  model = transformers.T5EncoderModel(config).eval()
  model.save_pretrained(directory, **save_kwargs)
  tokenizer.save_pretrained(directory)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("t5")
  v11 = _save_checkpoint(root / "v1_1", "gated-gelu", transformers.ByT5Tokenizer(), 0)
  # ~2 tensors per shard, so the index format is exercised.
  v10 = _save_checkpoint(root / "v1_0", "relu", _word_tokenizer(), 1, max_shard_size="20KB")
  assert (root / "v1_0" / hf_checkpoint.WEIGHTS_INDEX_NAME).is_file()
  return {"v1_1": (root / "v1_1", v11), "v1_0": (root / "v1_0", v10)}


def _torch_reference(model, tokens, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()


def test_relative_position_buckets_match_hf():
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = torch.arange(600)[None, :] - torch.arange(600)[:, None]
  for num_buckets, max_distance in [(32, 128), (8, 16), (64, 256)]:
    ref = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
    ours = t5.relative_position_buckets(600, 600, num_buckets, max_distance)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("variant", ["v1_1", "v1_0"])
def test_parity_with_pytorch(checkpoints, variant):
  directory, model = checkpoints[variant]
  encoder = TextEncoder.from_pretrained(directory, max_length=MAX_LENGTH)
  tokens, mask = encoder.tokenize(PROMPTS)
  assert mask.any(axis=1).all() and not mask.all()  # A padded batch.
  ref = _torch_reference(model, tokens, mask)
  hidden = np.asarray(encoder.module.apply({"params": encoder.params}, tokens, mask))
  assert hidden.shape == (len(PROMPTS), MAX_LENGTH, TINY["d_model"])
  np.testing.assert_allclose(hidden, ref, atol=1e-4, rtol=0)
  embeddings, encode_mask = encoder.encode(PROMPTS)
  np.testing.assert_array_equal(encode_mask, mask)
  np.testing.assert_allclose(embeddings, ref * mask[..., None], atol=1e-4, rtol=0)


def test_bfloat16_weights_and_compute(checkpoints, tmp_path):
  directory, model = checkpoints["v1_1"]
  shutil.copytree(directory, tmp_path / "bf16")
  (tmp_path / "bf16" / "model.safetensors").unlink()
  model_bf16 = transformers.T5EncoderModel(model.config).eval()
  model_bf16.load_state_dict(model.state_dict())
  model_bf16.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  reference = model_bf16.to(torch.float32)  # The bf16-rounded weights, computed in f32.
  encoder = TextEncoder.from_pretrained(tmp_path / "bf16", max_length=MAX_LENGTH)
  assert jax.tree.leaves(encoder.params)[0].dtype == np.float32
  tokens, mask = encoder.tokenize(PROMPTS)
  embeddings, _ = encoder.encode(PROMPTS)
  ref = _torch_reference(reference, tokens, mask) * mask[..., None]
  np.testing.assert_allclose(embeddings, ref, atol=1e-4, rtol=0)
  low = TextEncoder.from_pretrained(tmp_path / "bf16", max_length=MAX_LENGTH, dtype="bfloat16")
  low_embeddings, _ = low.encode(PROMPTS)
  assert low_embeddings.dtype == np.float32
  np.testing.assert_allclose(low_embeddings, ref, atol=0.1 * np.abs(ref).max())
  assert low.encoder_id != encoder.encoder_id


_SHARDED_SCRIPT = textwrap.dedent("""
  import sys
  import jax, numpy as np
  from diffusion_jax import sharding
  from diffusion_jax.text import TextEncoder
  assert jax.device_count() == 8, jax.devices()
  prompts = ["a red circle", "", "the big blue square on the left", "small", "a", "b", "c"]
  v1_1, v1_0 = sys.argv[1:]
  fsdp, fsdp_tp = sharding.make_mesh({"data": 8}), sharding.make_mesh({"data": 4, "model": 2})
  for source, meshes in [(v1_1, [fsdp, fsdp_tp]), (v1_0, [fsdp_tp])]:
    reference, _ = TextEncoder.from_pretrained(source, max_length=12).encode(prompts)
    for mesh in meshes:
      encoder = TextEncoder.from_pretrained(source, max_length=12, mesh=mesh)
      specs = {str(x.sharding.spec) for x in jax.tree.leaves(encoder.params)}
      assert any("data" in s for s in specs), specs  # Parameters really are split...
      assert mesh.shape.get("model", 1) == 1 or any("model" in s for s in specs), specs
      embeddings, _ = encoder.encode(prompts)  # ...and 7 prompts are padded to 8 inside.
      diff = float(np.abs(embeddings - reference).max())
      assert diff <= 1e-5, (source, dict(mesh.shape), diff)
      print(source, dict(mesh.shape), diff)
  # t5-offline: the same values whatever the layout (no forward pass needed to show it).
  offline = TextEncoder.from_pretrained("t5-offline").params
  sharded = TextEncoder.from_pretrained("t5-offline", mesh=fsdp).params
  for a, b in zip(jax.tree.leaves(offline), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  print("OK")
""")


def test_sharded_on_8_host_devices(checkpoints):
  root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(root),
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  sources = [str(checkpoints["v1_1"][0]), str(checkpoints["v1_0"][0])]
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, *sources], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


# --- Bad input: one clear error each. ---

def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    TextEncoder.from_pretrained(tmp_path / "nope")


def test_hub_id_offline_and_not_cached(monkeypatch):
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(FileNotFoundError, match=r"Hugging Face cache .*HF_HUB_OFFLINE.*"
                                              r"Missing: config\.json, model\.safetensors"):
    TextEncoder.from_pretrained("diffusion-jax-tests/no-such-t5")


def test_hub_id_resolves_from_the_hf_cache(checkpoints, tmp_path, monkeypatch):
  from huggingface_hub import constants
  repo = tmp_path / "models--tiny--t5-test"
  shutil.copytree(checkpoints["v1_1"][0], repo / "snapshots" / "0123abcd")
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0123abcd")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  encoder = TextEncoder.from_pretrained("tiny/t5-test", max_length=MAX_LENGTH)
  assert encoder.encoder_id.startswith("t5:t5-test@")
  local = TextEncoder.from_pretrained(checkpoints["v1_1"][0], max_length=MAX_LENGTH)
  np.testing.assert_array_equal(encoder.encode(["a"])[0], local.encode(["a"])[0])


def _forbid_the_hub(monkeypatch):
  """Cache lookups are allowed (and find nothing); any network use fails the test."""
  import huggingface_hub
  from huggingface_hub import constants
  from huggingface_hub.errors import LocalEntryNotFoundError

  def snapshot_download(repo_id, local_files_only=False, **kwargs):
    if local_files_only:
      raise LocalEntryNotFoundError(f"{repo_id} is not cached")
    pytest.fail(f"{repo_id!r} went to the hub")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("name", ["models/t5-small", "./t5-small", "~/no-such-dir/t5",
                                  "runs/a/t5", "/no/such/t5"])
def test_local_looking_missing_paths_fail_without_the_hub(name, tmp_path, monkeypatch):
  _forbid_the_hub(monkeypatch)
  monkeypatch.setattr(hf_checkpoint, "_hub_unreachable_reason",
                      lambda *a: pytest.fail("probed the hub"))
  monkeypatch.chdir(tmp_path)
  (tmp_path / "models").mkdir()  # so "models/t5-small" is a relative path, not "org/name"
  where = pathlib.Path(name).expanduser().resolve()
  with pytest.raises(FileNotFoundError) as error:
    hf_checkpoint.resolve_directory(name)
  message = str(error.value)
  assert f"directory {where} does not exist" in message
  assert "Missing there: config.json, model.safetensors" in message and "tokenizer" in message


def test_unreachable_hub_fails_fast(monkeypatch):
  """DNS or TCP that never answers must not stall resolution (HF_HUB_OFFLINE unset)."""
  import socket
  import threading
  import time

  _forbid_the_hub(monkeypatch)
  release = threading.Event()

  def hang(*args, **kwargs):
    release.wait(60)
    raise OSError("released by the test")

  monkeypatch.setattr(socket, "create_connection", hang)
  monkeypatch.setattr(hf_checkpoint, "HUB_PROBE_TIMEOUT_S", 0.3)
  start = time.perf_counter()
  try:
    with pytest.raises(FileNotFoundError, match=r"Hugging Face cache .*did not answer within "
                                                r"0\.3 s.*Missing: config\.json"):
      hf_checkpoint.resolve_directory("diffusion-jax-tests/no-such-t5")
  finally:
    release.set()
  assert time.perf_counter() - start < 3.0


def test_hub_failures_say_what_failed(tmp_path, monkeypatch):
  """Every failure of the hub path names its exception and message, none is swallowed."""
  import huggingface_hub
  import local_cluster
  from huggingface_hub import constants, errors

  # A refused connection is reported as such, not as "did not answer".
  port = local_cluster.free_port()
  reason = hf_checkpoint._hub_unreachable_reason(f"http://127.0.0.1:{port}", 2.0)
  assert f"127.0.0.1:{port} failed (ConnectionRefusedError" in reason, reason
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)
  # Not a valid hub id: huggingface_hub's own reason.
  with pytest.raises(FileNotFoundError, match=r"not a valid hub id \(HFValidationError: "
                                              r"Cannot have -- or \.\."):
    hf_checkpoint.resolve_directory("bad..name")

  # A download that fails: its exception and message.
  def snapshot_download(repo_id, local_files_only=False, **kwargs):
    if local_files_only:
      raise errors.LocalEntryNotFoundError("not cached")
    raise OSError("403 Forbidden: gated repo, accept its licence first")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  monkeypatch.setattr(hf_checkpoint, "_hub_unreachable_reason", lambda *a: None)
  with pytest.raises(FileNotFoundError, match=r"failed \(OSError: 403 Forbidden: gated repo"):
    hf_checkpoint.resolve_directory("org/gated-t5")

  # A cache lookup that fails for another reason than "not cached": said, with the cache.
  def broken_cache(repo_id, local_files_only=False, **kwargs):
    raise PermissionError(13, "Permission denied", str(tmp_path / "cache" / "models--org"))

  monkeypatch.setattr(huggingface_hub, "snapshot_download", broken_cache)
  with pytest.raises(ValueError, match=r"in the Hugging Face cache \(.*cache\) failed: "
                                       r"PermissionError: \[Errno 13\] Permission denied"):
    hf_checkpoint.resolve_directory("org/some-t5")


def test_cached_hub_id_wins_over_a_local_lookalike(tmp_path, monkeypatch):
  from huggingface_hub import constants
  snapshot = tmp_path / "cache" / "models--tiny--t5-test" / "snapshots" / "0123abcd"
  snapshot.mkdir(parents=True)
  (snapshot / "config.json").write_text("{}")
  (snapshot.parent.parent / "refs").mkdir()
  (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(hf_checkpoint, "_hub_unreachable_reason",
                      lambda *a: pytest.fail("probed the hub"))
  monkeypatch.chdir(tmp_path)
  (tmp_path / "tiny").mkdir()
  assert hf_checkpoint.resolve_directory("tiny/t5-test") == snapshot


def test_missing_weights(checkpoints, tmp_path):
  shutil.copy(checkpoints["v1_1"][0] / "config.json", tmp_path)
  with pytest.raises(FileNotFoundError, match="has no weights: expected model.safetensors"):
    TextEncoder.from_pretrained(tmp_path)


def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    TextEncoder.from_pretrained(tmp_path)


def test_pickle_only_directory(checkpoints, tmp_path):
  shutil.copy(checkpoints["v1_1"][0] / "config.json", tmp_path)
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ValueError, match="only PyTorch pickle weights .*safetensors"):
    TextEncoder.from_pretrained(tmp_path)


def test_missing_shard(checkpoints, tmp_path):
  shutil.copytree(checkpoints["v1_0"][0], tmp_path / "ckpt")
  next((tmp_path / "ckpt").glob("model-00002-*.safetensors")).unlink()
  with pytest.raises(FileNotFoundError, match="shards that are missing: model-00002"):
    TextEncoder.from_pretrained(tmp_path / "ckpt")


def test_mismatched_shapes(checkpoints, tmp_path):
  shutil.copytree(checkpoints["v1_1"][0], tmp_path / "ckpt")
  config_path = tmp_path / "ckpt" / "config.json"
  config = json.loads(config_path.read_text())
  config["d_ff"] = 48
  config_path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"DenseReluDense.wi_0.weight has shape \(64, 32\) but "
                                       r"config.json implies \(32, 48\)"):
    TextEncoder.from_pretrained(tmp_path / "ckpt")


def test_missing_tensor(checkpoints, tmp_path):
  shutil.copytree(checkpoints["v1_1"][0], tmp_path / "ckpt")
  config_path = tmp_path / "ckpt" / "config.json"
  config = json.loads(config_path.read_text())
  config["num_layers"] = 3
  config_path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"missing tensor encoder.block.2"):
    TextEncoder.from_pretrained(tmp_path / "ckpt")


def test_unknown_model_type_and_missing_tokenizer(checkpoints, tmp_path):
  shutil.copytree(checkpoints["v1_1"][0], tmp_path / "ckpt")
  for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
    (tmp_path / "ckpt" / name).unlink(missing_ok=True)
  with pytest.raises(FileNotFoundError, match="has no tokenizer"):
    TextEncoder.from_pretrained(tmp_path / "ckpt")
  config_path = tmp_path / "ckpt" / "config.json"
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                     "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type 'gpt2'; supported text encoders: .*t5"):
    TextEncoder.from_pretrained(tmp_path / "ckpt")


def test_presets_shape_check():
  """T5-XXL's encoder at full size, built abstractly: ~4.76B parameters (incl. embedding)."""
  config = t5.PRESETS["t5-v1_1-xxl"]
  tokens = jax.ShapeDtypeStruct((1, 8), np.int32)
  mask = jax.ShapeDtypeStruct((1, 8), bool)
  abstract = jax.eval_shape(t5.T5Encoder(config).init, jax.random.key(0), tokens, mask)
  count = sum(x.size for x in jax.tree.leaves(abstract))
  assert 4.7e9 < count < 4.8e9, count
  assert set(t5.param_sources(config)) == set(traverse_util.flatten_dict(abstract["params"]))
