"""experiments/edit.py: one-line errors on bad input (before anything loads), and every
sub-command end to end on a base stage trained here for two steps (slow)."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import one_error_line
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
EDIT = ROOT / "experiments" / "edit.py"


def _edit(*args):
  return subprocess.run([sys.executable, str(EDIT), *args], capture_output=True, text=True,
                        timeout=900, cwd=ROOT)


def _png(path, size, mode="RGB", value=0):
  array = np.full((size, size, 3) if mode == "RGB" else (size, size), value, np.uint8)
  Image.fromarray(array, mode).save(path)
  return str(path)


def _bad_input(tmp_path):
  image, mask = _png(tmp_path / "in.png", 8), _png(tmp_path / "mask.png", 6, "L", 255)
  common = [f"--workdir={tmp_path}", f"--outdir={tmp_path / 'out'}", "--prompt=a red dot"]
  return image, mask, common


def test_bad_input_gets_one_error_line(tmp_path):
  # (each command costs ~30 s of imports on a busy machine: one here, more in the slow test)
  image, mask, common = _bad_input(tmp_path)
  line = one_error_line(_edit("inpaint", *common, f"--image={image}", f"--mask={mask}"))
  assert "must be the same size" in line
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_more_bad_input(tmp_path):
  image, mask, common = _bad_input(tmp_path)
  line = one_error_line(_edit("sdedit", *common, f"--image={image}", "--strength=0,0.5"))
  assert "--strength must lie in (0, 1]" in line
  assert "unknown sub-command" in one_error_line(_edit("img2img", *common))
  assert "is not a word of --target" in one_error_line(
      _edit("p2p", *common, "--target=a blue dot", "--reweight=green=2"))
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_every_sub_command_on_a_tiny_trained_stage(tmp_path):
  sys.path.insert(0, str(ROOT / "tests"))
  from probe_helpers import tiny_probe
  from test_sample import _tiny, _train

  from configs import demo_base
  workdir = _train(tmp_path / "base", _tiny(demo_base.get_config("smoke"), 8))
  image = _png(tmp_path / "in.png", 8, value=200)
  mask = np.zeros((8, 8), np.uint8)
  mask[:, 4:] = 255
  Image.fromarray(mask, "L").save(tmp_path / "mask.png")
  common = [f"--workdir={workdir}", "--prompt=a red dot", "--steps=3", "--num_images=2"]
  runs = {
      "sdedit": [f"--image={image}", "--strength=0.3,1.0"],
      "inpaint": [f"--image={image}", f"--mask={tmp_path / 'mask.png'}",
                  "--method=repaint", "--jump_length=1", "--jump_n_sample=2"],
      "p2p": ["--target=a blue dot", "--reweight=blue=2"],
      "p2p-eval": ["--num_cases=3", f"--probe_path={tiny_probe()[1]}"],
      "textual-inversion": [f"--images={image}", "--train_steps=2", "--init_word=dot",
                            "--prompt=a {} on the left"],
  }
  for command, args in runs.items():
    out = tmp_path / command
    r = _edit(command, *common, *args, f"--outdir={out}")
    assert r.returncode == 0, (command, r.stderr[-3000:])
    if command == "p2p-eval":
      record = json.loads((out / "p2p_eval.json").read_text())
      assert record["num_cases"] == 3 and record["scores"]
      continue
    assert (out / f"{command}.png").is_file()
    assert json.loads((out / "edit.json").read_text())["command"] == command
  assert (tmp_path / "textual-inversion" / "learned_embeds.safetensors").is_file()
  # The learned token loads for the other sub-commands; an inpainted known region is the
  # input's (the right half is generated, the left kept).
  r = _edit("p2p", *common, "--target=a blue dot", f"--outdir={tmp_path / 'p2p_ti'}",
            f"--embedding={tmp_path / 'textual-inversion' / 'learned_embeds.safetensors'}")
  assert r.returncode == 0 and "<s*>" in r.stdout, r.stderr[-3000:]
