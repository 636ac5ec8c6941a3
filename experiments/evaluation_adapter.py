"""What an ablation arm's evaluation is: ShapesEval + FD-probe through
``evaluating.run_evaluation``, its result flattened to the harness's metrics
(``{"value", "low", "high"}`` each; ``low``/``high`` the 95% Wilson interval)."""

from __future__ import annotations

import inspect
import pathlib

from builders import UserError

# Evaluation settings a sweep's ``evaluate`` section may hold (run_evaluation's own
# arguments); ``sample.*`` axes are the sampler flags sample.py takes.
EVALUATE_KEYS = ("categories", "images_per_prompt", "batch_size", "fd_images", "seed",
                 "probe_dir", "probe_path", "clip_score_model")


def sampler_flag_names() -> tuple[str, ...]:
  import sampler_flags

  return tuple(sampler_flags.NAMES)


def metrics_of(result: dict) -> dict[str, dict]:
  """eval.json -> {metric: {"value", "low", "high"}}: per category and split
  (``colour_shape``, ``colour_shape/held_out``, ...), the overall score, FD-probe."""
  metrics = {}
  summary = result["summary"]
  for category, entry in summary["categories"].items():
    for split in ("all", "seen", "held_out"):
      if split in entry:
        cell = entry[split]
        name = category if split == "all" else f"{category}/{split}"
        metrics[name] = {"value": cell["accuracy"], "low": cell["ci95"][0],
                         "high": cell["ci95"][1]}
  metrics["overall"] = {"value": summary["overall"], "low": None, "high": None}
  if result.get("clip_score"):
    c = result["clip_score"]
    metrics["clip_score"] = {"value": c["value"], "low": c["ci95"][0], "high": c["ci95"][1]}
  for fd in ("fd_probe", "fd_judge"):  # (fd_judge: a labelled real-data set's judge)
    if result.get(fd):
      metrics[fd] = {"value": result[fd]["generated_vs_real"], "low": None, "high": None}
  return metrics


class ShapesEvaluator:
  """Evaluates an arm's trained stages with the sweep's ``evaluate`` settings and the
  arm's ``sample.*`` overrides."""

  def __init__(self, settings: dict):
    unknown = sorted(set(settings) - set(EVALUATE_KEYS))
    if unknown:
      raise UserError(f"the sweep's evaluate section has unknown settings {unknown}; "
                      f"known: {', '.join(EVALUATE_KEYS)}.")
    self.settings = dict(settings)

  def check(self, sample_overrides: dict, num_stages: int, shown: str) -> None:
    """Refuses an unknown ``sample.*`` name or a value sample.py would refuse (parsed per
    stage as sampling parses it, and each stage's settings checked on a stand-in spec),
    before anything trains."""
    import evaluating
    import guide_builders
    import sampling

    from diffusion_jax import cascade

    known = [n for n in sampler_flag_names() if n not in ("workdirs", "stages")]
    for name in sample_overrides:
      if name not in known:
        raise UserError(f"{shown}: axis 'sample.{name}' is not a sampling setting; choose "
                        f"one of {', '.join('sample.' + n for n in known)}.")
    params = inspect.signature(evaluating.run_evaluation).parameters
    assert all(k in params for k in EVALUATE_KEYS), "run_evaluation's arguments changed"
    settings = {k: _as_flag(v) for k, v in sample_overrides.items()
                if k not in ("seed", *guide_builders.FLAGS)}
    try:
      guide_builders.check(sample_overrides)
      per_stage, _ = sampling.stage_settings(num_stages, num_workdirs=num_stages, **settings)
      for own in per_stage:
        own = {k: v for k, v in own.items() if v is not None}
        own["sampler_options"] = tuple(own.get("sampler_options", {}).items())
        # (diffusers' spacings need a discrete schedule: the stand-in's is continuous, so
        # a grid kind is checked when the arm's own stages load)
        own.pop("grid_kind", None)
        cascade.StageSpec(resolution=32, **own)
    except UserError as e:
      raise UserError(f"{shown}: {e}") from None
    except ValueError as e:
      raise UserError(f"{shown}: a sample.* value is refused: {e}") from None

  def evaluate(self, workdirs: list[str], outdir: pathlib.Path,
               sample_overrides: dict) -> dict:
    import evaluating

    kwargs = {k: _as_flag(v) for k, v in sample_overrides.items()}
    result = evaluating.run_evaluation(outdir=str(outdir), workdirs=list(workdirs),
                                       **self.settings, **kwargs)
    return metrics_of(result)


def _as_flag(value):
  """A sweep value as sample.py's flag value: lists (one per stage) as lists of strings."""
  if isinstance(value, list | tuple):
    return [str(v) for v in value]
  return value
