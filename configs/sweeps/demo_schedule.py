r"""Issue 16's learning-rate lever: the demo base stage (min-SNR-5) trained for 1200 steps
(about the 1181 its 7-minute budget reaches here) with a constant learning rate, against
a cosine decay to zero at step 1200 (a short run's usual last gain), at the demo's rate
1e-3 and at 2e-3; scored at steps 1000 and 1200 of each run.

  python experiments/ablate.py --sweep=configs/sweeps/demo_schedule.py --root=runs/sweeps
"""

_CHECKPOINTS = (1000, 1200)
_SCHEDULES = ({"base.optimizer.learning_rate": 1e-3, "base.optimizer.decay_steps": None},
              {"base.optimizer.learning_rate": 1e-3, "base.optimizer.decay_steps": 1200},
              {"base.optimizer.learning_rate": 2e-3, "base.optimizer.decay_steps": 1200})


def get_config():
  c = {}
  c["name"] = "demo_schedule"
  c["stages"] = {"base": "configs/demo_base.py"}
  # Objects of either size, as measured (the demo's are all large since).
  c["fixed"] = {"base.data.shapes_single_size": None,
                "base.train.time_budget_s": None, "base.train.num_steps": 1200,
                "base.train.checkpoint_every": 200, "base.train.keep_checkpoints": 10,
                "sample.guidance_scale": 3.0, "sample.sampler": "dpmpp_2m", "sample.steps": 25}
  c["arms"] = [dict(s, **{"sample.checkpoint_steps": k}) for s in _SCHEDULES
               for k in _CHECKPOINTS]
  c["evaluate"] = {"categories": ["colour_shape"], "images_per_prompt": 2, "fd_images": 0}
  c["report"] = {"metrics": ["colour_shape", "colour_shape/held_out"]}
  return c
