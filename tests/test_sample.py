"""experiments/sample.py end to end on two stages trained here for two steps (a base
stage at 8 px and an 8 -> 16 px super-resolution stage, the demo presets at tiny sizes,
the offline T5): grids, single images, samples.json, regenerating one image alone from
its record, and one-line errors on bad input."""

import json
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest
import training_helpers as th
from cli_helpers import one_error_line
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "experiments" / "sample.py"
sys.path.insert(0, str(ROOT / "experiments"))

import builders  # noqa: E402
import sampling  # noqa: E402

from configs import demo_base, demo_sr  # noqa: E402
from diffusion_jax.models import unet as unet_lib  # noqa: E402
from diffusion_jax.training import loop as loop_lib  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _tiny(config, resolution, lowres=None):
  config.data.resolution = resolution
  config.diffusion.schedule_kwargs.shifted_cosine.resolution = resolution
  config.diffusion.schedule_kwargs.shifted_cosine.base_resolution = lowres or resolution
  if lowres:  # a full-frame SR stage (demo_sr itself trains on crops), so it must chain
    config.data.lowres_resolution = lowres
    config.data.crop, config.data.shapes_resolution = "center", None
  config.text.encoder, config.text.max_length, config.text.cache_dir = "t5-offline", 32, None
  config.train.batch_size, config.train.num_steps = 4, 2
  config.train.checkpoint_every, config.train.preview_every = 1, 0
  return config


def _train(workdir, config):
  """Two steps with the experiment's own settings, on in-memory shapes (no TFDS)."""
  d = config.data
  loop_lib.train(
      workdir, model=unet_lib.UNet(builders.unet_config(config)),
      loop=builders.loop_settings(config), step_settings=builders.step_settings(config),
      optimizer=builders.optimizer_settings(config),
      data_factory=lambda: th.ShapesIterator(config.train.batch_size, d.resolution,
                                             d.lowres_resolution),
      text_encoder=builders.text_encoder(config), config_json=config.to_dict(),
      log=lambda s: None)
  return str(workdir)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("stages")
  base = _train(root / "base", _tiny(demo_base.get_config("smoke"), 8))
  sr = _train(root / "sr", _tiny(demo_sr.get_config("smoke"), 16, lowres=8))
  return base, sr


def _sample(*args, cwd=ROOT):
  return subprocess.run([sys.executable, str(SAMPLE), *args], capture_output=True, text=True,
                        timeout=900, cwd=cwd)


def _png(path):
  return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def sampled(workdirs, tmp_path_factory):
  out = tmp_path_factory.mktemp("samples")
  # ddpm draws fresh noise every step, so regenerating an image alone checks that every
  # draw is per image; checkpoint 1 of the SR stage checks --checkpoint_steps.
  # Non-default grids, sampler options and guidance schedules: the regenerate command
  # must carry them too.
  r = _sample(f"--workdirs={','.join(workdirs)}", *[f"--prompts={p}" for p in PROMPTS],
              f"--outdir={out}", "--sampler=ddpm", "--steps=3", "--guidance_scale=2,1.5",
              "--aug_level=0.2", "--checkpoint_steps=latest,1", "--seed=5",
              "--variance=large,", "--grid=karras,uniform", "--rho=3",
              "--guidance_schedule=cosine,constant", "--guidance_min=0.5",
              f"--export_dir={out / 'export'}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "stage 1/2: 8 px" in r.stdout and "stage 2/2: 16 px" in r.stdout
  return out


def test_sample_writes_grids_images_and_record(sampled, workdirs):
  record = json.loads((sampled / "samples.json").read_text())
  assert record["prompts"] == PROMPTS and record["seed"] == 5 and record["first_index"] == 0
  assert record["checkpoint_steps"] == [2, 1]
  base, sr = record["stages"]
  assert (base["source"], base["step"], base["resolution"]) == (workdirs[0], 2, 8)
  assert (sr["source"], sr["step"], sr["resolution"]) == (workdirs[1], 1, 16)
  assert [s["guidance_scale"] for s in record["stages"]] == [2.0, 1.5]
  assert sr["aug_level"] == 0.2 and sr["sampler"] == "ddpm" and sr["num_steps"] == 3
  assert (base["grid_kind"], base["rho"], sr["grid_kind"]) == ("karras", 3.0, "uniform")
  assert base["sampler_options"] == [["variance", "large"]] and sr["sampler_options"] == []
  assert (base["guidance_schedule"], base["guidance_min"]) == ("cosine", 0.5)
  assert sr["guidance_schedule"] == "constant"
  assert "--checkpoint_steps=2,1" in record["regenerate"]
  for number, res in ((1, 8), (2, 16)):
    singles = np.stack([_png(sampled / "images" / f"{i:04d}_{res}px.png") for i in range(3)])
    assert singles.shape == (3, res, res, 3) and singles.dtype == np.uint8
    assert singles.std() > 0 and not np.array_equal(singles[0], singles[1])
    # The stage's grid holds exactly its single images, cut out at their offsets. Layout of
    # images.make_grid as sampling.py calls it: up to 4 columns, tiles scaled up to 128 px,
    # `pad` px around and between cells, and under each tile a strip of 12 px per caption
    # line (every prompt here fits on one line).
    grid = _png(sampled / f"stage{number}_{res}px.png")
    scale, columns, pad, caption_h = 128 // res, min(4, len(PROMPTS)), 2, 12
    tile = res * scale
    cell_h, cell_w = tile + caption_h + pad, tile + pad
    rows = -(-len(PROMPTS) // columns)
    assert grid.shape == (rows * cell_h + pad, columns * cell_w + pad, 3), grid.shape
    for i, single in enumerate(singles):
      row, column = divmod(i, columns)
      y, x = pad + row * cell_h, pad + column * cell_w
      np.testing.assert_array_equal(grid[y:y + tile, x:x + tile],
                                    single.repeat(scale, 0).repeat(scale, 1), err_msg=i)
      assert grid[y + tile:y + tile + caption_h, x:x + tile].min() < 128, i  # a caption


def test_regenerate_image_alone_from_the_record(sampled, tmp_path):
  record = json.loads((sampled / "samples.json").read_text())
  i = 2
  command = record["regenerate"].replace("<prompt i>", shlex.quote(PROMPTS[i])).replace(
      "<i>", str(i)).replace("<dir>", str(tmp_path))
  args = shlex.split(command)
  assert args[:2] == ["python", "experiments/sample.py"]
  r = _sample(*args[2:])
  assert r.returncode == 0, r.stderr[-3000:]
  alone = json.loads((tmp_path / "samples.json").read_text())
  assert alone["checkpoint_steps"] == [2, 1] and alone["first_index"] == i
  assert alone["prompts"] == [PROMPTS[i]]
  assert alone["stages"] == record["stages"] and alone["regenerate"] == record["regenerate"]
  assert {p.name for p in (tmp_path / "images").iterdir()} == {f"{i:04d}_8px.png",
                                                               f"{i:04d}_16px.png"}
  for res in (8, 16):
    batch = _png(sampled / "images" / f"{i:04d}_{res}px.png").astype(int)
    single = _png(tmp_path / "images" / f"{i:04d}_{res}px.png").astype(int)
    # Batch size changes XLA's float rounding by ~1e-6, which can move a pixel across a
    # uint8 rounding boundary; a different image would differ by far more.
    assert np.abs(batch - single).max() <= 1, res
    other = _png(sampled / "images" / f"{i - 1:04d}_{res}px.png").astype(int)
    assert np.abs(other - single).max() > 1


def test_regenerate_the_whole_run_exactly(sampled, tmp_path):
  # The same batch as the recorded run: identical pixels, every setting carried by the
  # command (a grid, sampler option or guidance schedule it dropped would change them).
  record = json.loads((sampled / "samples.json").read_text())
  args = shlex.split(record["regenerate"].replace(" --prompts=<prompt i>", "").replace(
      "<i>", "0").replace("<dir>", str(tmp_path)))
  r = _sample(*args[2:], *[f"--prompts={p}" for p in PROMPTS])
  assert r.returncode == 0, r.stderr[-3000:]
  for i in range(len(PROMPTS)):
    for res in (8, 16):
      name = f"{i:04d}_{res}px.png"
      np.testing.assert_array_equal(_png(tmp_path / "images" / name),
                                    _png(sampled / "images" / name), err_msg=name)


# One non-default argument per schedule, for the two-step runs below.
CHANGED = {"linear": ("beta_end", 0.03), "cosine": ("s", 0.02), "sigmoid": ("start", -2.0),
           "shifted_cosine": ("logsnr_max", 10.0)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHANGED))
def test_every_schedule_trains_two_steps_and_samples(workdirs, tmp_path, name):
  """A super-resolution stage trained with schedule and lowres_schedule ``name`` (each
  with a changed argument), sampled after the base stage; a discrete schedule on a
  diffusers spacing, the others on a Karras grid. (test_cli.py checks every schedule's
  config path cheaply.)"""
  arg, value = CHANGED[name]
  config = _tiny(demo_sr.get_config("smoke"), 16, lowres=8)
  config.diffusion.schedule = config.diffusion.lowres_schedule = name
  config.diffusion.schedule_kwargs[name][arg] = value
  config.diffusion.lowres_schedule_kwargs[name][arg] = value
  sr = _train(tmp_path / "sr", config)
  grid = "trailing" if name in ("linear", "cosine") else "karras"
  result = sampling.sample_cascade(workdirs=[workdirs[0], sr], prompts=PROMPTS[:2],
                                   steps=3, grid=["uniform", grid], aug_level=0.3)
  assert [x.shape for x in result.images] == [(2, 8, 8, 3), (2, 16, 16, 3)]
  assert all(np.all(np.isfinite(x)) for x in result.images)
  spec = result.record["stages"][1]
  assert (spec["schedule"], spec["lowres_schedule"], spec["grid_kind"]) == (name, name, grid)
  assert dict(spec["schedule_kwargs"])[arg] == value
  assert dict(spec["lowres_schedule_kwargs"])[arg] == value


# The prompts are checked before any workdir is read: these workdirs do not exist, and
# would be the error if they were looked at first.
NO_WORKDIRS = "--workdirs=a,b"


def test_missing_prompt_file(tmp_path):
  r = _sample(NO_WORKDIRS, f"--prompts_file={tmp_path / 'no.txt'}",
              f"--outdir={tmp_path / 'out'}", cwd=tmp_path)
  assert f"--prompts_file {tmp_path / 'no.txt'} does not exist" in one_error_line(r)
  assert not (tmp_path / "out").exists()


def test_zero_prompts(tmp_path):
  empty = tmp_path / "prompts.txt"
  empty.write_text("\n  \n")
  r = _sample(NO_WORKDIRS, f"--prompts_file={empty}", f"--outdir={tmp_path / 'out'}",
              cwd=tmp_path)
  assert "holds no prompts (blank lines are skipped)" in one_error_line(r)
  r = _sample(NO_WORKDIRS, f"--outdir={tmp_path / 'out'}", cwd=tmp_path)
  assert "No prompts: pass --prompts=" in one_error_line(r)
  assert not (tmp_path / "out").exists()


def test_stage_resolution_that_does_not_chain(workdirs, tmp_path):
  # base 8 px -> SR 8->16 px -> the same SR stage again, which would get 16 px inputs
  # for an 8 px low-res conditioning (and silently sample 32 px without the check).
  base, sr = workdirs
  r = _sample(f"--workdirs={base},{sr},{sr}", "--prompts=a red circle",
              f"--outdir={tmp_path / 'out'}")
  line = one_error_line(r)
  assert f"error: {sr} does not chain with the stage before it: it was trained to " \
         "upsample 8 -> 16 px, but the stage before it samples at 16 px" in line
  r = _sample(f"--workdirs={sr},{base}", "--prompts=a red circle",
              f"--outdir={tmp_path / 'out'}")
  assert "the first stage of a cascade must be a base stage" in one_error_line(r)
  assert not (tmp_path / "out").exists()


def test_exported_stages_are_checked_to_chain(sampled):
  export = sampled / "export"
  spec = json.loads((export / "stage_2" / "stage.json").read_text())["spec"]
  assert (spec["resolution"], spec["aug_level"], spec["trained_on_crops"]) == (16, 0.2, False)
  with pytest.raises(builders.UserError, match="Stage 3 does not chain: it was trained to "
                                               "upsample 8 -> 16 px, but the stage before"):
    sampling.load_cascade(exported=[export / "stage_1", export / "stage_2",
                                    export / "stage_2"])


def test_exported_stages_keep_their_settings_and_options_follow_the_sampler(sampled):
  export = sampled / "export"
  spec = sampling._exported_spec(export / "stage_1", {})
  assert (spec.grid_kind, spec.rho, spec.guidance_schedule) == ("karras", 3.0, "cosine")
  assert spec.sampler_options == (("variance", "large"),)
  # A new option merges into the stage's own; a new sampler drops the old sampler's.
  assert sampling._exported_spec(export / "stage_1", {"sampler_options": {
      "variance": "small"}}).sampler_options == (("variance", "small"),)
  spec = sampling._exported_spec(export / "stage_1", {"sampler": "ddim",
                                                      "sampler_options": {"eta": 1.0}})
  assert (spec.sampler, spec.sampler_options) == ("ddim", (("eta", 1.0),))
  # Checked before any params are read.
  with pytest.raises(builders.UserError, match="grid 'leading' is a spacing of a discrete"):
    sampling.sample_cascade(stages=[export / "stage_1", export / "stage_2"],
                            prompts=["a red circle"], grid="leading")


@pytest.mark.parametrize("changes,message", [
    (dict(checkpoint_steps=["2", "7"]), "has no checkpoint at step 7; it has steps [1, 2]"),
    (dict(checkpoint_steps=["2", "1", "1"]), "--checkpoint_steps needs 1 or 2 values"),
    (dict(checkpoint_steps=["two", "1"]), "--checkpoint_steps=two,1: not a list of numbers"),
    (dict(aug_level=["0.1", "0.2"]), "--aug_level needs 1 value (one per super-resolution"),
    (dict(aug_level=["1.5"]), "aug_level must lie in [0, 1], got 1.5"),
    (dict(guidance_scale=["1", "2", "3"]), "--guidance_scale needs 1 or 2 values"),
    (dict(guidance_scale=["strong"]), "--guidance_scale=strong: not a list of numbers"),
    (dict(first_index=-1), "--first_index=-1; it must be >= 0"),
    (dict(eta=-0.5), "eta must be >= 0, got -0.5"),
    (dict(sampler="heun", eta="0.5"), "sampler 'heun' has no option 'eta' (it takes churn"),
    (dict(grid="trailing"), "grid 'trailing' is a spacing of a discrete schedule's"),
    (dict(grid="karras", rho="0"), "rho must be positive, got 0.0"),
    (dict(stages=["x"]), "either as --workdirs (training runs) or as --stages"),
])
def test_bad_sampling_flags_fail_before_loading(workdirs, tmp_path, changes, message):
  kwargs = dict(workdirs=workdirs, prompts=["a red circle"], outdir=tmp_path / "out")
  with pytest.raises(builders.UserError) as e:
    sampling.sample_cascade(**{**kwargs, **changes})
  assert message in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "out").exists()


def test_both_restores_name_the_checkpoint_steps_a_workdir_has(workdirs):
  # The step check restore_ema_params and restore_text_ema_params share (a trained text
  # encoder is restored before any U-Net); sampling adds "(fix --checkpoint_steps)".
  base, _ = workdirs
  config = sampling.load_workdir_config(base)
  expected = f"{base} has no checkpoint at step 7; it has steps [1, 2]."
  with pytest.raises(FileNotFoundError) as e:
    loop_lib.restore_ema_params(
        base, model=unet_lib.UNet(builders.unet_config(config)),
        loop=builders.loop_settings(config), text_len=config.text.max_length, text_dim=256,
        step=7)
  assert str(e.value) == expected
  with pytest.raises(FileNotFoundError) as e:
    loop_lib.restore_text_ema_params(base, None, step=7)  # fails before using the encoder
  assert str(e.value) == expected


def test_a_base_stage_after_the_base_refines_it(workdirs, tmp_path):
  base, _ = workdirs
  result = sampling.sample_cascade(workdirs=[base, base], prompts=PROMPTS[:2],
                                   refine_strength=["", "0.5"], steps=["4"])
  assert [x.shape for x in result.images] == [(2, 8, 8, 3), (2, 8, 8, 3)]
  stages = result.record["stages"]
  assert [s["refine_strength"] for s in stages] == [None, 0.5]
  assert np.abs(result.images[1] - result.images[0]).max() > 0  # SDEdit changed them
  assert "--refine_strength=,0.5" in result.record["regenerate"]
  for kwargs, message in [
      (dict(workdirs=[base, base]), "every stage after the first must be a super-resolution "
       "stage, or a refiner (give it a --refine_strength)"),
      (dict(workdirs=[base], refine_strength=["0.5"]), "the first stage cannot be a refiner"),
      (dict(workdirs=[base, base], refine_strength=["", "1.5"]),
       "refine_strength must lie in (0, 1], got 1.5"),
      (dict(workdirs=[base, base], refine_strength=["", "x"]),
       "--refine_strength=,x: not a list of numbers")]:
    with pytest.raises(builders.UserError) as e:
      sampling.sample_cascade(prompts=PROMPTS[:1], outdir=tmp_path / "out", **kwargs)
    assert message in str(e.value), e.value
  assert not (tmp_path / "out").exists()
