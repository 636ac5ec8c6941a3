"""Image utilities: [-1, 1] float arrays <-> uint8, captioned PNG grids.

Captions are drawn in DejaVu Sans, which covers Latin, Greek, Cyrillic and many symbols:
the copy matplotlib (a pinned dependency) ships, else the system's (Debian
fonts-dejavu-core). A character the font has no glyph for (CJK, most emoji) is drawn as
"?" and the caption says so, rather than as a box that looks like any other.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import pathlib
import textwrap

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

_FONT_FILES = ("mpl-data/fonts/ttf/DejaVuSans.ttf",)  # inside the matplotlib package
_SYSTEM_FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",)
MISSING_GLYPH_NOTE = " [? = no glyph]"


@functools.cache
def caption_font(size: int = 10) -> tuple[ImageFont.ImageFont, frozenset[int] | None]:
  """(the caption font, the code points it has glyphs for; None: only ASCII is safe).

  DejaVu Sans from matplotlib's package data or the system; Pillow's default otherwise.
  """
  candidates = []
  spec = importlib.util.find_spec("matplotlib")
  if spec is not None and spec.origin:
    candidates += [pathlib.Path(spec.origin).parent / f for f in _FONT_FILES]
  candidates += [pathlib.Path(f) for f in _SYSTEM_FONTS]
  for path in candidates:
    if path.is_file():
      try:
        from fontTools.ttLib import TTFont  # matplotlib's own dependency

        with TTFont(str(path), lazy=True) as ttf:
          covered = frozenset(ttf.getBestCmap())
        return ImageFont.truetype(str(path), size), covered
      except (OSError, ImportError):
        continue
  return ImageFont.load_default(), None


def drawable_caption(caption: str, covered: frozenset[int] | None) -> str:
  """``caption`` with every character the font cannot draw replaced by "?", plus a note
  saying so when there was one."""
  def ok(ch):
    return ch.isspace() or (ord(ch) in covered if covered is not None else ch.isascii())

  if all(ok(ch) for ch in caption):
    return caption
  return "".join(ch if ok(ch) else "?" for ch in caption) + MISSING_GLYPH_NOTE


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[..., H, W, C] floats in [-1, 1] -> uint8 in [0, 255] (values outside are clipped)."""
  images = np.asarray(images, np.float32)
  return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def make_grid(images: np.ndarray, captions: list[str] | None = None, columns: int = 4,
              scale: int = 1, pad: int = 2) -> np.ndarray:
  """Tiles images [N, H, W, 3] (floats in [-1, 1] or uint8) into one uint8 [H', W', 3]
  image, with each caption wrapped under its tile."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  n, h, w, _ = images.shape
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
  columns = max(1, min(columns, n))
  rows = -(-n // columns)
  font, covered = caption_font()
  chars = max(8, w // 6)
  wrapped = ([textwrap.wrap(drawable_caption(c, covered), chars)[:4] for c in captions]
             if captions else None)
  text_h = 12 * max((len(lines) for lines in wrapped), default=0) if wrapped else 0
  cell_h, cell_w = h + text_h + pad, w + pad
  canvas = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), "white")
  draw = ImageDraw.Draw(canvas)
  for i in range(n):
    r, c = divmod(i, columns)
    x, y = pad + c * cell_w, pad + r * cell_h
    canvas.paste(Image.fromarray(images[i]), (x, y))
    if wrapped:
      for j, line in enumerate(wrapped[i]):
        draw.text((x, y + h + 1 + 12 * j), line, fill="black", font=font)
  return np.asarray(canvas)


def save_png(image_uint8: np.ndarray, path: str | os.PathLike) -> epath.Path:
  """Writes a PNG to a local or remote (``gs://...``, via ``etils.epath``) path. Locally
  atomically (temp file + rename), so a crash never leaves half a PNG; remote object
  stores write whole objects anyway."""
  path = epath.Path(path)
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image_uint8)).save(buffer, format="PNG")
  path.parent.mkdir(parents=True, exist_ok=True)
  if "://" in str(path):
    path.write_bytes(buffer.getvalue())
    return path
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(path)
  return path
