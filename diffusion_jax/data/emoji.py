"""Colour emoji as a captioned image set: Noto Color Emoji's bitmaps, named by Unicode.

Sources (both Debian packages, nothing downloaded):
  fonts-noto-color-emoji (OFL / Apache-2.0): NotoColorEmoji.ttf, whose CBDT table holds one
      PNG per glyph (136x128, RGBA). A single code point reaches its glyph through the cmap;
      a sequence (ZWJ, flag, keycap, skin tone) through the GSUB ligatures of its code
      points' glyphs (U+FE0F, the emoji variation selector, is not in the font: shapers drop
      it, and so do we).
  unicode-data: /usr/share/unicode/emoji/emoji-test.txt, Unicode's list of emoji with each
      one's CLDR short name ("grinning face", "red heart", "flag: Germany") and group
      ("Smileys & Emotion", "Food & Drink", ...).

Names: the CLDR short names of emoji-test.txt rather than Python's `unicodedata.name`, which
knows single code points only and names some by their old black-and-white glyph (U+2764 is
"HEAVY BLACK HEART"; its image is a red heart). Sequences are included under their own names
("family: man, woman, boy", "flag: japan"), except skin-tone variants (U+1F3FB..U+1F3FF
modifiers): 1,785 of the 3,655 fully-qualified emoji of Unicode 15.0 differ from another only
in a skin colour; `skin_tones=True` keeps them. The "Component" group (bare skin tones, hair
styles) is never included.

Caption = "{name}, {group}", lower-cased, "&" spelt "and": "red apple, food and drink".
Held-out split: an emoji is in `test` when the SHA-256 of its code points (hex, '-'-joined,
without U+FE0F) is 0 mod HELD_OUT_EVERY, so membership depends on the emoji alone, not on
the font's version or the order of the list (about one in ten; disjoint from `train`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib

import numpy as np
from PIL import Image

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_PATH = "/usr/share/unicode/emoji/emoji-test.txt"
FONT_INSTALL = "apt-get install fonts-noto-color-emoji"
EMOJI_TEST_INSTALL = "apt-get install unicode-data"
VARIATION_SELECTOR = 0xFE0F
SKIN_TONES = range(0x1F3FB, 0x1F400)
HELD_OUT_EVERY = 10
BACKGROUND = (255, 255, 255)
# PIL's bicubic resize widens its kernel when downsampling, so it is antialiased.
_RESAMPLE = Image.Resampling.BICUBIC


@dataclasses.dataclass(frozen=True)
class Emoji:
  """One emoji: code points without U+FE0F, CLDR short name and group as in emoji-test.txt."""
  codepoints: tuple[int, ...]
  name: str
  group: str

  @property
  def key(self) -> str:
    """'1F600', '1F468-200D-1F469-200D-1F466': the identity the held-out split hashes."""
    return "-".join(f"{c:04X}" for c in self.codepoints)

  @property
  def caption(self) -> str:
    return f"{self.name}, {self.group}".lower().replace("&", "and")

  @property
  def has_skin_tone(self) -> bool:
    return any(c in SKIN_TONES for c in self.codepoints)


def is_held_out(emoji: Emoji) -> bool:
  """True for the fixed evaluation split (see the module docstring)."""
  digest = hashlib.sha256(emoji.key.encode("ascii")).digest()
  return int.from_bytes(digest[:8], "big") % HELD_OUT_EVERY == 0


def split_of(emoji: Emoji) -> str:
  return "test" if is_held_out(emoji) else "train"


def parse_emoji_test(text: str) -> list[Emoji]:
  """The fully-qualified emoji of an emoji-test.txt, in file order, without the Component group.

  Lines look like
    1F600  ; fully-qualified  # 😀 E1.0 grinning face
  under '# group: Smileys & Emotion' headers.
  """
  group, entries = None, []
  for number, line in enumerate(text.splitlines(), 1):
    if line.startswith("# group:"):
      group = line.split(":", 1)[1].strip()
      continue
    if not line.strip() or line.startswith("#"):
      continue
    fields, _, comment = line.partition("#")
    points, _, status = fields.partition(";")
    if status.strip() != "fully-qualified" or group == "Component":
      continue
    # comment: "<emoji> E<version> <name>"
    parts = comment.strip().split(" ", 2)
    if group is None or len(parts) != 3 or not parts[1].startswith("E"):
      raise ValueError(f"emoji-test.txt line {number} is not '<code points> ; <status> # "
                       f"<emoji> E<version> <name>' under a '# group:' header: {line!r}")
    try:
      codepoints = tuple(int(p, 16) for p in points.split() if int(p, 16) != VARIATION_SELECTOR)
    except ValueError:
      raise ValueError(f"emoji-test.txt line {number}: bad code points {points!r}") from None
    entries.append(Emoji(codepoints, parts[2].strip(), group))
  return entries


def emoji_test_path(source_dir: str | None = None) -> str:
  """emoji-test.txt (in `source_dir` if given), checked to exist."""
  path = pathlib.Path(os.path.expanduser(source_dir)) / "emoji-test.txt" if source_dir \
      else pathlib.Path(EMOJI_TEST_PATH)
  if not path.is_file():
    fix = f"install it with: {EMOJI_TEST_INSTALL}" if not source_dir else "put it there"
    raise FileNotFoundError(f"Emoji names: {path} not found; {fix} (or make data-real).")
  return str(path)


def font_path(source_dir: str | None = None) -> str:
  """NotoColorEmoji.ttf (in `source_dir` if given), checked to exist."""
  path = pathlib.Path(os.path.expanduser(source_dir)) / "NotoColorEmoji.ttf" if source_dir \
      else pathlib.Path(FONT_PATH)
  if not path.is_file():
    fix = f"install it with: {FONT_INSTALL}" if not source_dir else "put it there"
    raise FileNotFoundError(f"Emoji images: {path} not found; {fix} (or make data-real).")
  return str(path)


@dataclasses.dataclass(frozen=True)
class GlyphTable:
  """What a colour font maps emoji to: cmap {code point: glyph}, ligatures {component glyphs:
  glyph} (GSUB type 4) and the PNG bytes of each bitmap glyph (CBDT, first strike)."""
  cmap: dict[int, str]
  ligatures: dict[tuple[str, ...], str]
  pngs: dict[str, bytes]

  def png(self, emoji: Emoji) -> bytes | None:
    """The emoji's PNG, or None if the font has no glyph for it."""
    try:
      glyphs = tuple(self.cmap[c] for c in emoji.codepoints)
    except KeyError:
      return None
    glyph = glyphs[0] if len(glyphs) == 1 else self.ligatures.get(glyphs)
    return self.pngs.get(glyph)


def read_font(path: str) -> GlyphTable:
  """The GlyphTable of a CBDT colour font (e.g. NotoColorEmoji.ttf), read with fontTools."""
  from fontTools.ttLib import TTFont, TTLibError

  try:
    font = TTFont(path)
    if "CBDT" not in font:
      raise ValueError(f"{path} has no CBDT (colour bitmap) table; use NotoColorEmoji.ttf.")
    strikes = font["CBDT"].strikeData
    cmap = font.getBestCmap() or {}
    ligatures = {}
    if "GSUB" in font:
      for lookup in font["GSUB"].table.LookupList.Lookup:
        if lookup.LookupType != 4:  # ligature substitution
          continue
        for subtable in lookup.SubTable:
          for first, ligs in subtable.ligatures.items():
            for lig in ligs:
              ligatures.setdefault((first, *lig.Component), lig.LigGlyph)
    # Formats 17-19 hold PNG data; the font has one strike (109 ppem, 136x128 images).
    pngs = {glyph: bitmap.imageData for glyph, bitmap in strikes[0].items()
            if getattr(bitmap, "imageData", b"")[:8] == b"\x89PNG\r\n\x1a\n"} if strikes else {}
  except (TTLibError, OSError, AssertionError, KeyError, IndexError) as e:
    raise ValueError(f"{path}: cannot read as a colour emoji font: {e}") from None
  return GlyphTable(dict(cmap), ligatures, pngs)


def select(entries: list[Emoji], table: GlyphTable, skin_tones: bool = False,
           ) -> tuple[list[tuple[Emoji, bytes]], int]:
  """([(emoji, png)] of the entries the font draws, in order; number without a glyph).

  Skin-tone variants are left out unless `skin_tones` (not counted as missing)."""
  chosen, missing = [], 0
  for emoji in entries:
    if emoji.has_skin_tone and not skin_tones:
      continue
    png = table.png(emoji)
    if png is None:
      missing += 1
    else:
      chosen.append((emoji, png))
  return chosen, missing


def render(png: bytes, size: int, background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
  """uint8 [size, size, 3]: the PNG composited over `background`, padded to a centred square
  (emoji bitmaps are 136x128) and resized with an antialiasing filter."""
  image = Image.open(io.BytesIO(png)).convert("RGBA")
  side = max(image.size)
  canvas = Image.new("RGBA", (side, side), (*background, 255))
  canvas.alpha_composite(image, ((side - image.width) // 2, (side - image.height) // 2))
  canvas = canvas.convert("RGB")
  if side != size:
    canvas = canvas.resize((size, size), _RESAMPLE)
  return np.asarray(canvas)
