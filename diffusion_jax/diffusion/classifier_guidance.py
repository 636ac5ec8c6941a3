"""Classifier guidance with a noise-aware attribute classifier (Dhariwal & Nichol 2021,
"Diffusion Models Beat GANs on Image Synthesis", sec. 4).

The guided noise estimate is eps_hat - s sigma grad_x log p(y | x_t) (``guidance.classifier``)
with log p(y | x_t) the classifier's log-probability of the prompt's attributes: the sum
over the attributes the prompt states (colour and shape, and its position if it names one)
of the log-softmax of that attribute's logits at the prompt's label. The attributes are
taken to be independent given x_t (one head each), so the sum is log p(colour, shape, ... |
x_t) of a factorised classifier. At s = 1 with the exact p(y | x_t) and the exact
unconditional denoiser this is the denoiser of p(x0 | y) (tests/test_classifier_guidance).

Like CLIP guidance it is a wrapper of ``model_fn``, so it composes with classifier-free
guidance (wrap the CFG model_fn), CLIP guidance (wrap again), thresholding and every
sampler. ``ClassifierGuide`` is the form ``cascade.Cascade`` applies to its base stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import guidance

# (x_t [B, ...], logsnr [B]) -> {attribute: logits [B, K_a]}.
LogitsFn = Callable[[jnp.ndarray, jnp.ndarray], dict]
UNSTATED = -1  # the label of an attribute a prompt does not state: not guided on


def attribute_log_prob_fn(logits_fn: LogitsFn, labels: dict):
  """(x_t, logsnr) -> log p(labels | x_t) [B]: the sum over attributes of the log-softmax
  at ``labels[attribute]`` (int [B], or [] for every row; ``UNSTATED`` rows add 0)."""
  def log_prob(x_t, logsnr):
    logits = logits_fn(x_t, logsnr)
    total = jnp.zeros(x_t.shape[:1], jnp.float32)
    for name, label in labels.items():
      logp = jax.nn.log_softmax(logits[name].astype(jnp.float32), axis=-1)
      label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), x_t.shape[:1])
      picked = jnp.take_along_axis(logp, jnp.maximum(label, 0)[:, None], axis=-1)[:, 0]
      total = total + jnp.where(label >= 0, picked, 0.0)
    return total
  return log_prob


def classifier_guided(model_fn, logits_fn: LogitsFn, labels: dict, scale: float,
                      parameterization: str):
  """Wraps ``model_fn(x_t, logsnr)`` with classifier guidance of weight ``scale`` toward
  ``labels`` ({attribute: int [B]}): eps <- eps - scale sigma grad_x log p(labels | x_t).
  ``scale`` 0 returns ``model_fn`` itself."""
  if scale == 0:
    return model_fn
  return guidance.classifier(model_fn, attribute_log_prob_fn(logits_fn, labels), scale,
                             parameterization)


# The shapes caption's word for each attribute of a single-pair prompt.
_SPEC_FIELDS = {"colour": "color", "shape": "shape"}


def prompt_labels(prompts: Sequence[str], attributes) -> dict:
  """{attribute: int32 [B]} label indices of shapes-grammar ``prompts`` for a classifier's
  ``attributes`` ((name, labels) pairs: colour, shape, position), ``UNSTATED`` where a
  prompt says nothing about an attribute (no position). A prompt must name one colour x
  shape pair ("a red circle", "two red circles", "a red circle on the left"); anything
  else raises ValueError (one line)."""
  from diffusion_jax.data import shapes

  out = {name: np.full(len(prompts), UNSTATED, np.int32) for name, _ in attributes}
  for row, prompt in enumerate(prompts):
    try:
      spec = shapes.parse_caption(prompt)
    except ValueError as e:
      raise ValueError(f"classifier guidance cannot read prompt {prompt!r} ({e}): it needs "
                       "a shapes caption naming one colour and shape, e.g. 'a red circle'."
                       ) from None
    pairs = {(g["color"], g["shape"]) for g in spec["groups"]}
    if len(pairs) != 1:
      raise ValueError(f"classifier guidance needs prompts naming one colour x shape pair "
                       f"(its classifier reads one kind of object); {prompt!r} names "
                       f"{len(pairs)} (in ShapesEval: the colour_shape, counting and "
                       "position categories).")
    group = spec["groups"][0]
    for name, labels in attributes:
      value = spec["position"] if name == "position" else group.get(_SPEC_FIELDS.get(name))
      if value is None:
        continue
      if value not in labels:
        raise ValueError(f"classifier guidance: {name} {value!r} of prompt {prompt!r} is "
                         f"not among the classifier's labels ({', '.join(labels)}).")
      out[name][row] = labels.index(value)
  return out


class ClassifierGuide:
  """Classifier guidance of weight ``scale`` with an ``models.attribute_classifier``
  classifier, for ``cascade.Cascade`` (which applies it to the base stage):
  ``encode(prompts)`` -> {attribute: labels [B]} on the host (ValueError for a prompt it
  cannot read), ``wrapper(labels, parameterization)`` -> a model_fn wrapper."""

  def __init__(self, classifier, scale: float):
    if scale < 0:
      raise ValueError(f"classifier guidance scale must be >= 0, got {scale}.")
    self.classifier, self.scale = classifier, float(scale)

  def check_image_shape(self, shape: tuple[int, ...]) -> None:
    """ValueError unless the guided stage samples [R, R, C] images the classifier reads."""
    cfg = self.classifier.config
    want = (cfg.resolution, cfg.resolution, cfg.channels)
    if tuple(shape) != want:
      raise ValueError(f"the attribute classifier reads {want} images, the guided stage "
                       f"samples {tuple(shape)}: train one at the base stage's resolution "
                       "(configs/attribute_classifier_shapes.py's resolution).")

  def check_prompts(self, prompts) -> None:
    """ValueError (one line) for the first prompt ``encode`` cannot read."""
    self.encode(prompts)

  def encode(self, prompts) -> dict:
    return prompt_labels(list(prompts), self.classifier.config.attributes)

  def wrapper(self, labels: dict, parameterization: str):
    return lambda model_fn: classifier_guided(model_fn, self.classifier.logits, labels,
                                              self.scale, parameterization)
