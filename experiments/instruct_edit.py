"""InstructPix2Pix with an image-conditioned stage (configs/instruct_shapes.py): edit.py's
``instruct`` and ``instruct-eval`` sub-commands.

  instruct       edits --image by the instruction --prompt with dual classifier-free
                 guidance (Brooks et al. 2023, eq. 3) at every (--image_guidance s_I,
                 --text_guidance s_T) pair; writes instruct.png (input, then a row per
                 pair) and edit.json.
  instruct-eval  edits --num_pairs held-out exact edit pairs (editing.edit_pairs, never in a
                 training split) at each (s_I, s_T) and scores them with the shapes probe
                 (evaluation.edit_score: edit made, nothing else changed, Wilson 95%
                 intervals) beside the exact edits and the unedited inputs; writes
                 instruct_eval.md, instruct_eval.json and instruct_eval.png.

Image i of a pair-of-scales row is sampled from fold_in(seed, i) whatever the scales, so
rows differ only by guidance.
"""

from __future__ import annotations

import json
import pathlib

import cli
import sampling
from cli import UserError

COMMANDS = ("instruct", "instruct-eval")
EVAL_BATCH = 32  # images per compiled sampling call (the last batch is padded)


def _floats(values, flag: str) -> list[float]:
  try:
    out = [float(v) for v in values]
  except ValueError:
    raise UserError(f"--{flag}={','.join(values)} is not a list of numbers.") from None
  if not out:
    raise UserError(f"--{flag} is empty; give one or more scales, e.g. --{flag}=1.5.")
  return out


def check_flags(command: str, f) -> dict:
  """Every check that needs no checkpoint (after edit.py's --workdir / --outdir)."""
  parsed = {"image_scales": _floats(f.image_guidance, "image_guidance"),
            "text_scales": _floats(f.text_guidance, "text_guidance")}
  if command == "instruct":
    if not f.prompt or not f.prompt.strip():
      raise UserError("--prompt is empty; give the instruction, e.g. --prompt='make the "
                      "circle red'.")
    if not f.image:
      raise UserError("instruct needs --image=PNG (the image to edit).")
    if f.num_images < 1:
      raise UserError(f"--num_images={f.num_images}; it must be >= 1.")
  elif f.num_pairs < 1:
    raise UserError(f"--num_pairs={f.num_pairs}; it must be >= 1.")
  if f.probe_path and not pathlib.Path(f.probe_path).is_file():
    raise UserError(f"--probe_path {f.probe_path} does not exist; omit it to use the "
                    "cached default probe (trained on first use).")
  return parsed


def _stage_config(f):
  """The workdir's config, refused unless it is an image-conditioned stage."""
  config = sampling.load_workdir_config(f.workdir, f.checkpoint_step)
  conditioning = config.get("conditioning") or {}
  kind = conditioning.get("kind", "none")
  if kind != "input_image":
    raise UserError(f"{f.workdir} is not an image-conditioned stage (its "
                    f"config.conditioning.kind is {kind!r}, not 'input_image'); give the "
                    "workdir of a stage trained with configs/instruct_shapes.py.")
  return config


def _load(f):
  cascade, described, _ = sampling.load_cascade(
      [f.workdir], checkpoint_steps=None if f.checkpoint_step is None else
      [f.checkpoint_step], sampler=f.sampler, num_steps=f.steps)
  return cascade.stages[0], cascade.text_encoder, described[0]


def editor(stage, encoder):
  """A function (input images [B, H, W, 3] in [-1, 1], instructions [B], image keys [B],
  s_I, s_T) -> edited images [B, H, W, 3] in [-1, 1]; compiled once per batch size (the
  scales are traced, so a grid of scales reuses it)."""
  import jax
  import jax.numpy as jnp

  from diffusion_jax import cascade as cascade_lib
  from diffusion_jax.diffusion import guidance, samplers
  from diffusion_jax.editing import dual_guidance

  spec = stage.spec
  net = cascade_lib.stage_model_fn(stage.model, stage.params, spec.preconditioner())
  null_emb, null_mask = encoder.encode([""])
  null_text = {"text_emb": jnp.asarray(null_emb[0]), "text_mask": jnp.asarray(null_mask[0])}
  grid = spec.grid()

  from diffusion_jax import conditioning as conditioning_lib

  others = [d for d in stage.conditioning if d["kind"] != "input_image"]

  def other_inputs(batch: int) -> dict:
    """The stage's other conditions (e.g. SDXL's micro-conditioning) at their sampling
    defaults, the same in all three guidance terms."""
    out = {}
    for described in others:
      default = conditioning_lib.sampling_default(described, batch, spec.resolution)
      if default is None:
        raise UserError(f"this stage is also conditioned on {described['kind']}, which "
                        "instruct cannot give it.")
      out.update(default)
    return out

  @jax.jit
  def run(images, text_emb, text_mask, keys, image_scale, text_scale):
    extra = other_inputs(images.shape[0])
    cond, image_only, null = dual_guidance.instruct_conditions(
        images, {"text_emb": text_emb, "text_mask": text_mask, **extra},
        {**null_text, **extra})
    model_fn = guidance.thresholded(
        dual_guidance.dual_classifier_free(net, cond, image_only, null, text_scale,
                                           image_scale),
        spec.parameterization, spec.threshold, spec.percentile)
    x_T = samplers.initial_noise(keys, images.shape)
    return samplers.sample(spec.sampler, model_fn, x_T, grid, keys,
                           parameterization=spec.parameterization, **dict(spec.sampler_options))

  def edit(images, instructions, keys, image_scale, text_scale):
    emb, mask = encoder.encode(list(instructions))
    return run(jnp.asarray(images, jnp.float32), jnp.asarray(emb), jnp.asarray(mask), keys,
               jnp.float32(image_scale), jnp.float32(text_scale))

  return edit


def _scales(parsed) -> list[tuple[float, float]]:
  return [(i, t) for i in parsed["image_scales"] for t in parsed["text_scales"]]


def _write(outdir, name, tiles, captions, columns, resolution, record) -> pathlib.Path:
  import numpy as np

  from diffusion_jax import images as images_lib

  outdir = pathlib.Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  grid = images_lib.make_grid(np.concatenate([np.asarray(t) for t in tiles]), captions,
                              columns=columns, scale=max(1, 128 // resolution))
  path = images_lib.save_png(grid, outdir / f"{name}.png")
  (outdir / record.pop("_file")).write_text(json.dumps(record, indent=2, default=str))
  return pathlib.Path(str(path))


def run_instruct(f, parsed) -> pathlib.Path:
  import jax
  import numpy as np

  from diffusion_jax.diffusion import samplers

  config = _stage_config(f)
  resolution = config.data.resolution
  pixels = cli.read_png(f.image, "--image", resolution, resize=False)
  pixels = pixels.astype(np.float32) / 127.5 - 1.0
  stage, encoder, described = _load(f)
  n = f.num_images
  keys = samplers.image_keys(jax.random.key(f.seed), n)
  edit = editor(stage, encoder)
  images = np.broadcast_to(pixels, (n, *pixels.shape))
  tiles, captions = [images], ["input"] + [""] * (n - 1)  # a row of its own
  for s_i, s_t in _scales(parsed):
    tiles.append(edit(images, [f.prompt] * n, keys, s_i, s_t))
    captions += [f"s_I={s_i:g} s_T={s_t:g}: {f.prompt}"] * n
  record = {"_file": "edit.json", "command": "instruct", "prompt": f.prompt, "seed": f.seed,
            "stage": described, "text_encoder": encoder.encoder_id, "image": f.image,
            "scales": [{"image_guidance": i, "text_guidance": t} for i, t in _scales(parsed)]}
  path = _write(f.outdir, "instruct", tiles, captions, n, resolution, record)
  print(f"wrote {path} and {pathlib.Path(f.outdir) / 'edit.json'}")
  return path


def run_instruct_eval(f, parsed) -> pathlib.Path:
  import jax
  import numpy as np

  from diffusion_jax.diffusion import samplers
  from diffusion_jax.editing import edit_pairs
  from diffusion_jax.evaluation import edit_score
  from diffusion_jax.evaluation import probe as probe_lib

  config = _stage_config(f)
  resolution = config.data.resolution
  probe = probe_lib.load(f.probe_path) if f.probe_path else probe_lib.load_or_train()
  stage, encoder, described = _load(f)
  # The dataset's stream (seed 0, as builders prepare it), indices no train split reaches.
  pairs = [edit_pairs.held_out_pair(0, i, resolution) for i in range(f.num_pairs)]
  inputs = np.stack([p.before_image for p in pairs]).astype(np.float32) / 127.5 - 1.0
  key = jax.random.key(f.seed)
  edit = editor(stage, encoder)
  rows, examples, per_pair = {}, [], {}
  shown = min(8, len(pairs))
  for s_i, s_t in _scales(parsed):
    outputs = []
    for start in range(0, len(pairs), EVAL_BATCH):
      chunk = list(range(start, min(start + EVAL_BATCH, len(pairs))))
      padded = chunk + [chunk[-1]] * (EVAL_BATCH - len(chunk)) if len(pairs) > EVAL_BATCH \
          else chunk
      out = edit(inputs[padded], [pairs[i].instruction for i in padded],
                 samplers.image_keys(key, len(padded), start), s_i, s_t)
      outputs.append(np.asarray(out)[:len(chunk)])
    outputs = np.concatenate(outputs)
    label = f"model s_I={s_i:g} s_T={s_t:g}"
    records = edit_score.score_images(pairs, outputs, probe)
    rows[label], per_pair[label] = edit_score.summarise(records), records
    examples.append((label, outputs[:shown]))
  rows.update(edit_score.reference_rows(pairs, probe))
  title = (f"Instruction edits of {f.workdir} (step {described.get('step')}), "
           f"{len(pairs)} held-out pairs, scored by the shapes probe")
  table = edit_score.markdown(rows, title)
  outdir = pathlib.Path(f.outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  (outdir / "instruct_eval.md").write_text(table + "\n")
  before = inputs[:shown]
  after = np.stack([p.after_image for p in pairs[:shown]]).astype(np.float32) / 127.5 - 1.0
  tiles = [before, after] + [images for _, images in examples]
  captions = ([f"input: {p.instruction}" for p in pairs[:shown]] + ["exact edit"] * shown
              + [label for label, _ in examples for _ in range(shown)])
  record = {"_file": "instruct_eval.json", "command": "instruct-eval", "seed": f.seed,
            "stage": described, "text_encoder": encoder.encoder_id, "num_pairs": len(pairs),
            "probe": probe.settings.key(), "scores": rows, "per_pair": per_pair}
  path = _write(outdir, "instruct_eval", tiles, captions, shown, resolution, record)
  print(table)
  print(f"wrote {outdir / 'instruct_eval.md'}, {outdir / 'instruct_eval.json'} and {path}")
  return path


def run(command: str, f) -> pathlib.Path:
  parsed = check_flags(command, f)
  return (run_instruct if command == "instruct" else run_instruct_eval)(f, parsed)
