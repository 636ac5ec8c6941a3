r"""Edits with a trained base stage: one sub-command per method, each writing a captioned
before / after grid (and edit.json) to --outdir.

  python experiments/edit.py sdedit --workdir=runs/demo/base --image=in.png \
      --prompt="a blue square" --strength=0.4,0.7 --outdir=runs/edit
  python experiments/edit.py inpaint --workdir=runs/demo/base --image=in.png \
      --mask=mask.png --prompt="a red circle" --outdir=runs/edit   # mask: white = generate
  python experiments/edit.py inpaint-eval --workdir=runs/inpaint --method=stage \
      --num_cases=64 --outdir=runs/inpaint_eval
  python experiments/edit.py p2p-eval --workdir=runs/demo/base --num_cases=96 \
      --outdir=runs/p2p_eval
  python experiments/edit.py p2p --workdir=runs/demo/base --prompt="a red circle" \
      --target="a blue circle" --outdir=runs/edit
  python experiments/edit.py textual-inversion --workdir=runs/demo/base \
      --images=concept/*.png --token="<s*>" --init_word=shape --outdir=runs/ti
  python experiments/edit.py instruct --workdir=runs/instruct --image=in.png \
      --prompt="make the circle red" --image_guidance=1,1.5 --text_guidance=3,7.5 \
      --outdir=runs/edit
  python experiments/edit.py instruct-eval --workdir=runs/instruct --num_pairs=200 \
      --outdir=runs/instruct_eval

sdedit: SDEdit (Meng et al. 2022) at each --strength in (0, 1]. inpaint: the known-region
wrapper (--method=replace, any sampler), RePaint with resampling jumps (--method=repaint),
or an inpainting stage that takes the masked image and mask as input channels
(--method=stage, --workdir trained with configs/inpaint_shapes.py). inpaint-eval: any of
those three replacing the object of --num_cases validation scenes by another colour and
shape, scored by the shapes probe (diffusion_jax/editing/inpaint_eval.py). p2p-eval:
colour word swaps of --num_cases prompts, Prompt-to-Prompt against the plain target from the
same noise, scored by the probe (colour changed, shape and position kept; p2p_eval.py).
p2p: Prompt-to-Prompt word swap (Hertz et al. 2022): the target keeps the source's
cross-attention maps for the first --replace_fraction of the steps (--reweight=word=2.0
re-weights a target word). textual-inversion: learns --token's embedding from --images
(all else frozen), writes learned_embeds.safetensors (diffusers' format) and samples
--prompt with it; --embedding=FILE loads such a file for the other sub-commands.
instruct / instruct-eval: InstructPix2Pix (Brooks et al. 2023) with a stage trained by
configs/instruct_shapes.py: edit --image by the instruction --prompt with dual guidance at
each (--image_guidance, --text_guidance) pair, or score edits of --num_pairs held-out edit
pairs with the shapes probe (experiments/instruct_edit.py).
Bad input stops with one "error: ..." line (exit 2) before anything is loaded.
"""

import glob
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import builders  # noqa: E402
import cli  # noqa: E402
import instruct_edit  # noqa: E402
import sampling  # noqa: E402
from absl import flags, logging  # noqa: E402
from cli import UserError  # noqa: E402

COMMANDS = ("sdedit", "inpaint", "inpaint-eval", "p2p", "p2p-eval", "textual-inversion",
            *instruct_edit.COMMANDS)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir of a base stage.")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step to load (default: latest).")
flags.DEFINE_string("outdir", None, "Where to write the grid and edit.json.")
flags.DEFINE_string("prompt", None, "The (source) prompt.")
flags.DEFINE_string("target", None, "p2p: the target prompt (one word swapped).")
flags.DEFINE_string("image", None, "sdedit / inpaint: the input image (PNG).")
flags.DEFINE_string("mask", None, "inpaint: mask PNG of the image's size, white = generate.")
flags.DEFINE_list("strength", ["0.5"], "sdedit: strengths in (0, 1].")
flags.DEFINE_enum("method", "replace", ["replace", "repaint", "stage"],
                  "inpaint method (stage: a stage trained with configs/inpaint_shapes.py).")
flags.DEFINE_integer("jump_length", 10, "repaint: levels per resampling jump.")
flags.DEFINE_integer("jump_n_sample", 1, "repaint: passes per jump point (1 = no jumps).")
flags.DEFINE_float("replace_fraction", 0.8, "p2p: fraction of steps with injected maps.")
flags.DEFINE_list("reweight", [], "p2p: word=scale pairs re-weighting target words.")
flags.DEFINE_list("images", [], "textual-inversion: concept images (PNG paths or globs).")
flags.DEFINE_string("token", "<s*>", "textual-inversion: the placeholder token.")
flags.DEFINE_string("init_word", None, "textual-inversion: word initialising the token.")
flags.DEFINE_string("template", "a picture of {}", "textual-inversion: training prompt.")
flags.DEFINE_integer("train_steps", 200, "textual-inversion: optimisation steps.")
flags.DEFINE_float("learning_rate", 5e-3, "textual-inversion: Adam learning rate.")
flags.DEFINE_string("embedding", None, "A learned_embeds.safetensors to load first.")
flags.DEFINE_integer("num_images", 2, "Images per edit (seeds fold_in(seed, i)).")
flags.DEFINE_integer("num_cases", 64, "inpaint-eval / p2p-eval: cases to score.")
flags.DEFINE_string("probe_path", None, "inpaint-eval / instruct-eval: a saved probe file "
                    "to score with (default: the cached probe, trained on first use).")
flags.DEFINE_integer("seed", 0, "Seed of the run.")
flags.DEFINE_string("sampler", None, "ddpm | ddim | dpmpp_2m | euler | heun.")
flags.DEFINE_integer("steps", None, "Sampling steps.")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale.")
flags.DEFINE_list("image_guidance", ["1.5"], "instruct: image guidance scales s_I.")
flags.DEFINE_list("text_guidance", ["7.5"], "instruct: text guidance scales s_T.")
flags.DEFINE_integer("num_pairs", 100, "instruct-eval: held-out edit pairs to score.")


_read_png = cli.read_png


def check_flags(command: str, f) -> dict:
  """Every check that needs no checkpoint; returns parsed values."""
  if command not in COMMANDS:
    raise UserError(f"unknown sub-command {command!r}; choose one of {', '.join(COMMANDS)} "
                    "(python experiments/edit.py sdedit --workdir=... ...).")
  if not f.workdir or not f.outdir:
    raise UserError("--workdir (a trained base stage) and --outdir are required.")
  if command in instruct_edit.COMMANDS:
    return instruct_edit.check_flags(command, f)
  if command not in ("inpaint-eval", "p2p-eval") and (not f.prompt or not f.prompt.strip()):
    raise UserError("--prompt is empty; give the prompt to edit towards (for p2p: the "
                    "source prompt).")
  if f.num_images < 1:
    raise UserError(f"--num_images={f.num_images}; it must be >= 1.")
  parsed = {}
  if command == "sdedit":
    try:
      parsed["strengths"] = [float(s) for s in f.strength]
    except ValueError:
      raise UserError(f"--strength={','.join(f.strength)} is not a list of numbers.") from None
    bad = [s for s in parsed["strengths"] if not 0.0 < s <= 1.0]
    if bad or not parsed["strengths"]:
      raise UserError(f"--strength must lie in (0, 1] (1 = from pure noise), got "
                      f"{','.join(f.strength)}.")
  if command in ("inpaint-eval", "p2p-eval") and f.num_cases < 1:
    raise UserError(f"--num_cases={f.num_cases}; it must be >= 1.")
  if command.endswith("-eval") and f.probe_path and not pathlib.Path(f.probe_path).is_file():
    raise UserError(f"--probe_path {f.probe_path} does not exist; omit it to use the cached "
                    "probe.")
  if command in ("sdedit", "inpaint") and not f.image:
    raise UserError(f"{command} needs --image=PNG.")
  if command == "inpaint":
    if not f.mask:
      raise UserError("inpaint needs --mask=PNG (white = region to generate).")
    image, mask = _read_png(f.image, "--image"), _read_png(f.mask, "--mask", mode="L")
    if image.shape[:2] != mask.shape[:2]:
      raise UserError(f"--mask is {mask.shape[1]}x{mask.shape[0]} px but --image is "
                      f"{image.shape[1]}x{image.shape[0]} px; they must be the same size.")
    if f.jump_length < 1 or f.jump_n_sample < 1:
      raise UserError("--jump_length and --jump_n_sample must be >= 1.")
  if command == "p2p":
    if not f.target or len(f.target.split()) != len(f.prompt.split()):
      raise UserError("p2p needs --target with as many words as --prompt (a word swap, "
                      "e.g. --prompt='a red circle' --target='a blue circle').")
    if not 0.0 <= f.replace_fraction <= 1.0:
      raise UserError(f"--replace_fraction={f.replace_fraction}; it must lie in [0, 1].")
    weights = {}
    for item in f.reweight:
      word, _, scale = item.partition("=")
      try:
        weights[word] = float(scale)
      except ValueError:
        raise UserError(f"--reweight={item}: write word=scale, e.g. blue=2.0.") from None
      if word not in f.target.split():
        raise UserError(f"--reweight word {word!r} is not a word of --target {f.target!r}.")
    parsed["reweight"] = weights
  if command == "textual-inversion":
    paths = sorted({p for pattern in f.images for p in (glob.glob(pattern) or [pattern])})
    if not paths:
      raise UserError("textual-inversion needs --images (3-10 PNGs of the concept).")
    if "{}" not in f.template:
      raise UserError(f"--template={f.template!r} needs a {{}} where the token goes.")
    if f.train_steps < 1:
      raise UserError(f"--train_steps={f.train_steps}; it must be >= 1.")
    for path in paths:
      _read_png(path, "--images entry")
    parsed["paths"] = paths
  if f.embedding and not pathlib.Path(f.embedding).is_file():
    raise UserError(f"--embedding {f.embedding} does not exist.")
  return parsed


def _load(f):
  """(Stage, text encoder) of the base stage in --workdir."""
  overrides = dict(sampler=f.sampler, num_steps=f.steps, guidance_scale=f.guidance_scale)
  cascade, described, _ = sampling.load_cascade(
      [f.workdir], checkpoint_steps=None if f.checkpoint_step is None else
      [f.checkpoint_step], **overrides)
  if len(cascade.stages) != 1:
    raise UserError("edit.py edits with one base stage; give one --workdir.")
  encoder = cascade.text_encoder
  if f.embedding:
    from diffusion_jax.editing import textual_inversion as ti
    try:
      encoder, names = ti.load_embedding(encoder, f.embedding)
    except (FileNotFoundError, ValueError) as e:
      raise UserError(str(e)) from None
    print(f"loaded {f.embedding}: token(s) {', '.join(names)}")
  return cascade.stages[0], encoder, described[0]


def _needed_condition(command: str, f) -> str | None:
  """The condition beyond text the sub-command's stage must have been trained with."""
  if command in ("inpaint", "inpaint-eval") and f.method == "stage":
    return "masked_image"
  return None


def _check_stage(command: str, f, stage) -> None:
  label = f"{command}{' --method=stage' if 'inpaint' in command and f.method == 'stage' else ''}"
  sampling.check_stage_condition(stage, _needed_condition(command, f), f.workdir, label)


def _guided(stage, cond, null):
  """The stage's guided, thresholded model_fn for cond (leaves [B, ...])."""
  from diffusion_jax import cascade as cascade_lib
  from diffusion_jax.diffusion import guidance

  net, spec = cascade_lib.stage_model_fn(stage.model, stage.params), stage.spec
  model_fn = (guidance.classifier_free(net, cond, null, spec.guidance_scale)
              if spec.guidance_scale != 1.0 else lambda x, lam: net(x, lam, cond))
  return guidance.thresholded(model_fn, spec.parameterization, spec.threshold,
                              spec.percentile)


def _encode(encoder, prompts):
  import jax.numpy as jnp
  emb, mask = encoder.encode(prompts)
  null_emb, null_mask = encoder.encode([""])
  return ({"text_emb": jnp.asarray(emb), "text_mask": jnp.asarray(mask)},
          {"text_emb": jnp.asarray(null_emb[0]), "text_mask": jnp.asarray(null_mask[0])})


def _sampler_call(stage, model_fn, x, grid, keys):
  from diffusion_jax.diffusion import samplers
  spec = stage.spec
  return samplers.sample(spec.sampler, model_fn, x, grid, keys,
                         parameterization=spec.parameterization,
                         **dict(spec.sampler_options))


_INPAINT_FNS: dict = {}  # one compiled program per (stage, method): inpaint-eval's batches


def _inpaint(stage, f, x0, generate, cond, null, keys):
  """Inpainted images [B, H, W, C] of ``x0`` [B, H, W, C] where ``generate`` [B, H, W]
  is True, by --method (replace / repaint: training-free with a text-to-image stage;
  stage: an inpainting stage conditioned on the masked image and mask)."""
  import dataclasses

  import jax
  import jax.numpy as jnp

  from diffusion_jax import cascade as cascade_lib
  from diffusion_jax import conditioning
  from diffusion_jax.diffusion import samplers
  from diffusion_jax.editing import inpainting

  spec, grid, method = stage.spec, stage.spec.grid(), f.method
  jumps = (f.jump_length, f.jump_n_sample)

  def run(params, x0, generate, cond, null, keys):
    own = dataclasses.replace(stage, params=params)
    if method == "stage":
      mask = generate.astype(jnp.float32)[..., None]
      # The masked image conditions both halves of the guidance; only the text is dropped.
      model_fn = cascade_lib.guided_model_fn(
          own.model, params, cond["text_emb"], cond["text_mask"], null,
          parameterization=spec.parameterization, guidance_scale=spec.guidance_scale,
          threshold=spec.threshold, percentile=spec.percentile,
          extra_cond={"cond_image": conditioning.masked_input(x0, mask)})
      return _sampler_call(own, model_fn, samplers.initial_noise(keys, x0.shape), grid, keys)
    known = ~generate
    model_fn = _guided(own, cond, null)
    if method == "replace":
      wrapped = inpainting.known_region_model_fn(model_fn, x0, known, spec.parameterization)
      return _sampler_call(own, wrapped, samplers.initial_noise(keys, x0.shape), grid, keys)
    return inpainting.repaint(model_fn, x0, known, grid, keys,
                              parameterization=spec.parameterization, sampler=spec.sampler,
                              jump_length=jumps[0], jump_n_sample=jumps[1])

  cache_key = (id(stage), method, jumps)
  if cache_key not in _INPAINT_FNS:
    _INPAINT_FNS[cache_key] = jax.jit(run)
  return _INPAINT_FNS[cache_key](stage.params, x0, jnp.asarray(generate, bool), cond, null,
                                 keys)


def _inpaint_eval(stage, encoder, described, f) -> pathlib.Path:
  """inpaint-eval: --num_cases object replacements (diffusion_jax.editing.inpaint_eval)
  by --method, scored by the shapes probe; writes inpaint_eval.{md,json} and a grid."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from diffusion_jax import images as images_lib
  from diffusion_jax.diffusion import samplers
  from diffusion_jax.editing import inpaint_eval
  from diffusion_jax.evaluation import probe as probe_lib

  res = stage.spec.resolution
  cases = inpaint_eval.make_cases(f.num_cases, res, seed=f.seed)
  probe = (probe_lib.load(f.probe_path) if f.probe_path else
           probe_lib.load_or_train(log=print))
  outputs, batch = [], 16
  for start in range(0, len(cases), batch):
    chunk = cases[start:start + batch]
    chunk = chunk + [chunk[-1]] * (batch - len(chunk))  # one compiled batch size
    x0 = jnp.asarray(np.stack([c.image for c in chunk]), jnp.float32) / 127.5 - 1.0
    cond, null = _encode(encoder, [c.prompt for c in chunk])
    keys = samplers.image_keys(jax.random.key(f.seed), batch, start=start)
    out = _inpaint(stage, f, x0, jnp.asarray(np.stack([c.generate for c in chunk])), cond,
                   null, keys)
    outputs.append(np.asarray(images_lib.to_uint8(out)))
  outputs = np.concatenate(outputs)[:len(cases)]
  summary = inpaint_eval.score(cases, outputs, probe)
  outdir = pathlib.Path(f.outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  table = inpaint_eval.markdown({f.method: summary})
  (outdir / "inpaint_eval.md").write_text(table)
  (outdir / "inpaint_eval.json").write_text(json.dumps(
      {"method": f.method, "stage": described, "num_cases": len(cases), "seed": f.seed,
       **summary}, indent=2, default=str))
  shown = min(len(cases), 8)
  tiles = np.concatenate([np.stack([c.image for c in cases[:shown]]),
                          np.stack([np.where(c.generate[..., None], 0, c.image)
                                    for c in cases[:shown]]), outputs[:shown]])
  captions = ([f"was: {' '.join(c.original)}" for c in cases[:shown]]
              + ["kept"] * shown + [c.prompt for c in cases[:shown]])
  grid = images_lib.make_grid(tiles, captions, columns=shown, scale=max(1, 128 // res))
  images_lib.save_png(grid, outdir / "inpaint_eval.png")
  print(table, end="")
  print(f"wrote {outdir / 'inpaint_eval.md'}, inpaint_eval.json, inpaint_eval.png")
  return outdir / "inpaint_eval.md"


def _p2p_sample(stage, encoder, sources, targets, key, f, reweight=None):
  """(sources, Prompt-to-Prompt targets, plain targets from the sources' noise), images
  [B, H, W, C]: target b keeps source b's cross-attention maps for the first
  --replace_fraction of the steps."""
  import jax
  import numpy as np

  from diffusion_jax import cascade as cascade_lib
  from diffusion_jax.diffusion import guidance, samplers
  from diffusion_jax.editing import prompt_to_prompt as p2p

  spec, grid, n = stage.spec, stage.spec.grid(), len(sources)
  shape = (spec.resolution, spec.resolution, stage.model.config.out_channels)
  kept = int(round(f.replace_fraction * (len(grid) - 1)))
  until = float(grid[kept - 1]) if kept > 0 else -np.inf
  try:
    control = p2p.pair_controls(encoder.tokenizer, sources, targets, encoder.max_length,
                                until, reweight)
  except ValueError as e:
    raise UserError(str(e)) from None
  cond, null = _encode(encoder, sources)
  target, _ = _encode(encoder, targets)
  net = cascade_lib.stage_model_fn(stage.model, stage.params)
  joint_fn = guidance.thresholded(
      p2p.joint_model_fn(net, cond, target, null, control, spec.guidance_scale),
      spec.parameterization, spec.threshold, spec.percentile)
  out = jax.jit(lambda k: _sampler_call(stage, joint_fn, samplers.initial_noise(
      k, (2 * n, *shape)), grid, k))(p2p.paired_keys(key, n))
  plain_fn = _guided(stage, target, null)
  plain = jax.jit(lambda k: _sampler_call(stage, plain_fn, samplers.initial_noise(
      k, (n, *shape)), grid, k))(samplers.image_keys(key, n))
  return out[:n], out[n:], plain


def run(command: str, f) -> pathlib.Path:
  """The sub-command's work; returns the grid's path."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from diffusion_jax import images as images_lib
  from diffusion_jax.diffusion import samplers
  from diffusion_jax.editing import sdedit

  if command in instruct_edit.COMMANDS:
    check_flags(command, f)
    return instruct_edit.run(command, f)
  parsed = check_flags(command, f)
  stage, encoder, described = _load(f)
  _check_stage(command, f, stage)
  if command == "inpaint-eval":
    return _inpaint_eval(stage, encoder, described, f)
  if command == "p2p-eval":
    import jax
    import p2p_eval

    key = jax.random.key(f.seed)
    return p2p_eval.run(stage, encoder, described, f, sample_pair=lambda s, t, i: _p2p_sample(
        stage, encoder, s, t, jax.random.fold_in(key, i), f))
  spec, n = stage.spec, f.num_images
  shape = (spec.resolution, spec.resolution, stage.model.config.out_channels)
  grid, key = spec.grid(), jax.random.key(f.seed)
  keys = samplers.image_keys(key, n)
  cond, null = _encode(encoder, [f.prompt] * n)
  tiles, captions = [], []

  def as_input(path):
    pixels = _read_png(path, "--image", spec.resolution).astype(np.float32) / 127.5 - 1.0
    return jnp.broadcast_to(jnp.asarray(pixels), (n, *shape))

  if command == "sdedit":
    x0 = as_input(f.image)
    tiles, captions = [x0[:1]], ["input"]
    model_fn = _guided(stage, cond, null)
    for strength in parsed["strengths"]:
      out = jax.jit(lambda x, k, s=strength: sdedit.sdedit(
          lambda m, xs, g, kk: _sampler_call(stage, m, xs, g, kk), model_fn, x, grid, s,
          k))(x0, keys)
      tiles.append(out)
      captions += [f"strength {strength}: {f.prompt}"] * n
  elif command == "inpaint":
    x0 = as_input(f.image)
    generate = _read_png(f.mask, "--mask", spec.resolution, mode="L") >= 128
    out = _inpaint(stage, f, x0, jnp.broadcast_to(jnp.asarray(generate), (n, *shape[:2])),
                   cond, null, keys)
    masked = jnp.where(~jnp.asarray(generate)[None, :, :, None], x0[:1], 0.0)
    tiles = [x0[:1], masked, out]
    captions = ["input", "kept (white mask = black here)"] + [f"{f.method}: {f.prompt}"] * n
  elif command == "p2p":
    source, edited, plain = _p2p_sample(stage, encoder, [f.prompt] * n, [f.target] * n, key,
                                        f, parsed["reweight"])
    tiles = [source, plain, edited]
    captions = ([f"source: {f.prompt}"] * n + [f"plain: {f.target}"] * n
                + [f"p2p: {f.target}"] * n)
  else:  # textual-inversion
    from diffusion_jax import cascade as cascade_lib
    from diffusion_jax.editing import textual_inversion as ti

    concept = np.stack([_read_png(p, "--images entry", spec.resolution)
                        for p in parsed["paths"]]).astype(np.float32) / 127.5 - 1.0
    try:
      encoder, ids = ti.add_tokens(encoder, f.token, init_word=f.init_word)
    except ValueError as e:
      raise UserError(str(e)) from None
    prompt = f.template.format(f.token)
    settings = ti.InversionSettings(
        parameterization=spec.parameterization, schedule=spec.schedule,
        schedule_kwargs=spec.schedule_kwargs, learning_rate=f.learning_rate)
    net = cascade_lib.stage_model_fn(stage.model, stage.params)
    encoder, history = ti.train(encoder, net, ids, concept, [prompt], key,
                                num_steps=f.train_steps, settings=settings,
                                batch_size=min(4, len(concept)))
    print(f"textual inversion: loss {history[0]:.4f} -> {history[-1]:.4f}")
    outdir = pathlib.Path(f.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    vectors = np.asarray(encoder.params[ti.table_name(encoder)]["embedding"])[ids]
    ti.save_embedding(outdir / "learned_embeds.safetensors", f.token, vectors)
    cond, null = _encode(encoder, [f.prompt.replace("{}", f.token)] * n)
    out = jax.jit(lambda k: _sampler_call(stage, _guided(stage, cond, null),
                                          samplers.initial_noise(k, (n, *shape)), grid,
                                          k))(keys)
    tiles = [jnp.asarray(concept[:4]), out]
    captions = ["concept"] * len(concept[:4]) + [f.prompt.replace("{}", f.token)] * n
  outdir = pathlib.Path(f.outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  grid_image = images_lib.make_grid(np.concatenate([np.asarray(t) for t in tiles]),
                                    captions, columns=max(n, 2),
                                    scale=max(1, 128 // spec.resolution))
  path = images_lib.save_png(grid_image, outdir / f"{command}.png")
  record = {"command": command, "prompt": f.prompt, "seed": f.seed, "stage": described,
            "text_encoder": encoder.encoder_id,
            "flags": {k: getattr(f, k) for k in ("target", "image", "mask", "strength",
                                                  "method", "replace_fraction", "reweight",
                                                  "token", "embedding")}}
  (outdir / "edit.json").write_text(json.dumps(record, indent=2, default=str))
  print(f"wrote {path} and {outdir / 'edit.json'}")
  return pathlib.Path(str(path))


def main(argv):
  if FLAGS.verbosity == 0:
    logging.set_verbosity(logging.WARNING)
  if len(argv) != 2:
    raise UserError(f"give one sub-command first: python experiments/edit.py "
                    f"{{{','.join(COMMANDS)}}} --workdir=... (got {argv[1:]}).")
  builders.setup_compilation_cache()
  run(argv[1], FLAGS)


if __name__ == "__main__":
  cli.run_main(main)
