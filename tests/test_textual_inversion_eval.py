"""textual_inversion_eval.py's concept renders and its pixel reading of samples."""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))

import textual_inversion_eval as tie  # noqa: E402

from diffusion_jax.data import shapes  # noqa: E402


def test_concepts_are_teal_circles_and_the_reader_finds_colour_and_side():
  images = tie.concept_images(6, 32, seed=0)
  assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
  assert [tie.read_object(im)[0] for im in images] == ["teal"] * 6
  for color, (x, side) in (("red", (0.25, "left")), ("blue", (0.75, "right"))):
    obj = shapes.SceneObject("square", color, shapes.COLORS[color], "medium", x, 0.5, 0.15)
    image = shapes.render(shapes.Scene((240, 240, 240), (obj,), {}), 32)
    name, cx = tie.read_object(image)
    assert name == color and abs(cx - x) < 0.03, (name, cx, side)
  blank = np.full((32, 32, 3), 240, np.uint8)
  assert tie.read_object(blank)[0] == "none"
