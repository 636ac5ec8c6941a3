"""benchmarks/peer_diffusers.py: the diffusers peer's configuration, FLOP counting and table
(tiny sizes; the measurement itself is `make bench-peer`)."""

import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
from cli_helpers import one_error_line

from diffusion_jax.models import unet

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import peer_diffusers  # noqa: E402
from cli import UserError  # noqa: E402  (experiments/cli.py, on the path peer_diffusers set)

# Two levels, cross-attention at the lower one, 2 heads, 4 text tokens 16 wide.
TINY = unet.UNetConfig(levels=unet._levels((1, 2), (1, 1), (False, True), (False, True)),
                       base_channels=32, num_heads=2, head_dim=16, text_width=16,
                       text_length=4)


def _load_script(name):
  spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "benchmarks" /
                                                f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_bench_peer_preset_maps_to_the_issues_24_8m_parameter_diffusers_unet():
  kwargs = peer_diffusers.unet_kwargs(unet.PRESETS["imagen_pytorch_cpu"])
  assert kwargs["block_out_channels"] == [64, 128, 256]
  assert kwargs["layers_per_block"] == [2, 2, 2]
  assert kwargs["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D",
                                        "CrossAttnDownBlock2D"]
  assert kwargs["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
  assert (kwargs["cross_attention_dim"], kwargs["text_length"]) == (256, 16)
  model, _ = peer_diffusers.build_unet(json.loads(json.dumps(kwargs)), 32)
  assert sum(p.numel() for p in model.parameters()) == 24_805_379
  assert model.config.attention_head_dim == (8, 8, 8)  # diffusers' name for the head count
  width = peer_diffusers.unet_kwargs(unet.PRESETS["imagen_pytorch_cpu"], heads="width")
  assert width["attention_head_dim"] == [1, 2, 4]  # 64-wide heads


def test_counted_conv_flops_are_the_closed_form():
  conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
  x = torch.randn(2, 3, 6, 6, requires_grad=True)
  forward = 2 * 2 * 5 * 6 * 6 * 3 * 9  # 2 FLOPs per multiply-add, every output position
  flops, _ = peer_diffusers.counted_flops(lambda: conv(x))
  assert flops == forward
  flops, _ = peer_diffusers.counted_flops(lambda: conv(x).sum().backward())
  assert flops == 3 * forward  # + gradient of the input + gradient of the weight


@pytest.mark.parametrize("lq,lk", [(6, 6), (6, 4)])
def test_cpu_flash_attention_is_counted_as_the_math_backends_matmuls(lq, lk):
  from torch.nn.attention import SDPBackend, sdpa_kernel
  q = torch.randn(2, 3, lq, 8, requires_grad=True)
  k = torch.randn(2, 3, lk, 8, requires_grad=True)
  v = torch.randn(2, 3, lk, 8, requires_grad=True)
  mask = torch.ones(2, 1, lq, lk, dtype=torch.bool)

  def step():
    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

  flash, _ = peer_diffusers.counted_flops(step)
  with sdpa_kernel(SDPBackend.MATH):
    math, _ = peer_diffusers.counted_flops(step)
  forward = 2 * 2 * 3 * lq * lk * (8 + 8)
  assert flash == math == 3 * forward


@pytest.fixture(scope="module")
def tiny_rows():
  kwargs = peer_diffusers.unet_kwargs(TINY)
  return {mode: peer_diffusers.run(kwargs, resolution=8, batch=2, steps=1, threads=1,
                                   mode=mode) for mode in peer_diffusers.MODES}


def test_a_tiny_peer_trains_and_its_row_is_consistent(tiny_rows):
  model, _ = peer_diffusers.build_unet(peer_diffusers.unet_kwargs(TINY), 8)
  for mode, row in tiny_rows.items():
    assert row["mode"] == mode
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["train_ips"] > 0 and row["forward_ips"] > 0 and row["rss_gb"] > 0
    assert row["gflops"] == pytest.approx(row["gflop"] / row["train_s"])
    # Closed form: backward = 2 x forward (the gradients of every matmul's, convolution's
    # and attention's two operands) less the input gradients nobody needs: of the image
    # (conv_in), the timestep features (time_embedding.linear_1) and the text tokens (the
    # cross-attentions' key and value projections).
    batch, length, height = 2, TINY.text_length, 8
    no_grad = 2 * batch * height**2 * 9 * model.conv_in.in_channels * (
        model.conv_in.out_channels)
    no_grad += 2 * batch * model.time_embedding.linear_1.weight.numel()
    no_grad += sum(2 * batch * length * projection.weight.numel()
                   for name, module in model.named_modules() if name.endswith("attn2")
                   for projection in (module.to_k, module.to_v))
    backward = round((row["gflop"] - row["forward_gflop"]) * 1e9)
    assert backward == round(2 * row["forward_gflop"] * 1e9) - no_grad
  # Autocast changes the arithmetic's precision, not its amount.
  assert tiny_rows["float32"]["gflop"] == tiny_rows["bf16_autocast"]["gflop"]


def test_the_train_step_updates_the_weights_and_bf16_autocast_computes_in_bf16():
  model, length = peer_diffusers.build_unet(peer_diffusers.unet_kwargs(TINY), 8)
  train_step, forward = peer_diffusers.make_steps(model, 8, 2, length, "bf16_autocast")
  assert forward().dtype == torch.bfloat16
  before = [p.detach().clone() for p in model.parameters()]
  loss = train_step()
  assert torch.isfinite(loss) and loss.dtype == torch.float32
  assert all(p.dtype == torch.float32 for p in model.parameters())
  assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)) > 0


def test_ratios_divide_ours_by_the_best_peer_mode_of_each_column():
  def row(train, forward, gflops, rss):
    return dict(resolution=32, params=1e6, gflop=100.0, train_ips=train, forward_ips=forward,
                gflops=gflops, rss_gb=rss)
  peers = {"float32": row(4.0, 10.0, 100.0, 2.0), "bf16_autocast": row(8.0, 5.0, 200.0, 4.0)}
  rows = peer_diffusers.table_rows({"float32": row(6.0, 20.0, 50.0, 1.0)}, peers)
  assert [r[1] for r in rows] == ["diffusers float32", "diffusers bf16_autocast",
                                  "ours float32"]
  assert rows[0][-4:] == ("",) * 4
  assert rows[2][-4:] == ("0.75x", "2.00x", "0.25x", "0.50x")
  assert len(rows[2]) == len(peer_diffusers.COLUMNS)


def test_ours_overrides_change_the_unet_config_and_bad_ones_say_what_to_fix():
  config = unet.PRESETS["imagen_pytorch_cpu"]
  changed = common.override_fields(config, "model.remat=true, num_heads=4,head_dim=none")
  assert changed == dataclasses.replace(config, remat=True, num_heads=4, head_dim=None)
  assert common.override_fields(config, "") == config
  with pytest.raises(UserError, match="field=value with a field of UNetConfig"):
    common.override_fields(config, "model.no_such_field=matmul")
  with pytest.raises(UserError, match="'x' is not a int"):
    common.override_fields(config, "num_heads=x")


@pytest.mark.parametrize("args,message", [
    (["--mode", "fp16"], "invalid choice: 'fp16'"),
    (["--unet_kwargs", "{nope"], "--unet_kwargs is not JSON"),
    (["--steps", "0"], "must be >= 1"),
])
def test_peer_script_reports_bad_flags_in_one_line(args, message):
  out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peer_diffusers.py"), *args],
                       capture_output=True, text=True, check=False)
  assert message in one_error_line(out)


@pytest.mark.parametrize("argv,message", [
    (["--ours_overrides=model.conv_kind=x"], "override 'model.conv_kind=x'"),
    (["--peer", "--peers", "diffusers,sd"], "--peers: unknown sd"),
])
def test_unet_benchmark_rejects_an_unknown_override_or_peer_before_running(argv, message):
  script = _load_script("unet")
  with pytest.raises(UserError, match=message):
    script.main(argv)


@pytest.mark.slow
def test_unet_benchmark_prints_ours_and_the_diffusers_peer_in_one_table():
  out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "unet.py"), "--peer",
                        "--peers", "diffusers", "--preset", "demo_base", "--resolutions", "16",
                        "--batch", "2", "--steps", "1"],
                       capture_output=True, text=True, check=True)
  table = out.stdout.split("diffusers UNet2DConditionModel")[1].splitlines()
  rows = [line.split("|") for line in table if line.strip().startswith("16 |")]
  assert [r[1].strip() for r in rows] == ["diffusers float32", "diffusers bf16_autocast",
                                          "ours float32", "ours bfloat16"]
  for r in rows[2:]:  # ratios to the best peer mode, all positive
    assert all(float(cell.strip().rstrip("x")) > 0 for cell in r[-4:])
