"""Calibration forwards in bfloat16 (qcompiler/calib/precision.py): what runs in bf16, what stays float32, and how
the choice reaches the statistics, the artefact and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from blocks import context, traced_block
from torch import fx

from qcompiler.calib.precision import calibration_forward
from qcompiler.calib.stats import StatRequest, StatsCache
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.pm.base import PassContext
from qcompiler.schemes import get_scheme
from qcompiler.targets import get_target

BF16_EPS = 2.0**-8  # bfloat16's spacing at 1 (8 bits of significand): rounding is within half of it


class TwoLinears(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = torch.nn.Linear(32, 48)
        self.down = torch.nn.Linear(48, 16)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_the_context_runs_gemms_in_bfloat16_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 8, generator=g), torch.randn(3, 8, generator=g)
    with calibration_forward("bfloat16"):
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16
        assert (x * 2).dtype == torch.float32  # elementwise ops keep their inputs' dtype
    with calibration_forward("float32"):
        assert torch.nn.functional.linear(x, w).dtype == torch.float32
    with pytest.raises(ValueError, match="float32, bfloat16"), calibration_forward("float16"):  # type: ignore[arg-type]
        pass


def test_static_activation_grid_is_computed_in_float32_for_a_bfloat16_input():
    """qc::fake_quant_act on bf16 values gives the codes float32 arithmetic gives them (a bf16 x / scale would round
    to bf16's spacing first: at |x / s| ≈ 100 that is 0.5, which moves values across a rounding boundary)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4096, generator=g) * 40).bfloat16()
    scale, zero = torch.tensor(0.3131), torch.tensor(0.0)
    got = torch.ops.qc.fake_quant_act(x, scale, zero, -128, 127)
    xf = x.float()
    expect = ((torch.clamp(torch.round(xf / scale) + zero, -128, 127) - zero) * scale).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expect)
    naive = (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale  # (rounds x / s in bf16)
    assert not torch.equal(naive.to(torch.bfloat16), expect)  # (so the check above can fail)


def test_statistics_accumulate_in_float_from_the_bfloat16_forward(tmp_path):
    """The Hessian of the second linear's input under the bf16 forward is Σ_b xᵀx of the values that forward produced,
    each batch's product a bfloat16 GEMM (float32 accumulation, the batch's sum rounded to bfloat16: within 2⁻⁸ of
    each entry, and further than float32's rounding, so the bf16 product ran), summed in float64; it differs from
    the float32 forward's by about bf16's rounding."""
    gm = fx.symbolic_trace(TwoLinears())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 64, 32, generator=g),) for _ in range(3)]
    node = next(n.name for n in gm.graph.nodes if n.target is torch.relu)
    req = StatRequest(node, "hessian")

    cache = StatsCache(tmp_path / "stats")  # (one cache for both runs: a float32 entry must not answer a bf16 run)

    def hessian(precision: str) -> torch.Tensor:
        ctx = PassContext(block="toy", scheme=get_scheme("w4a16"), target=get_target("reference"), calib=batches,
                          forward_precision=precision, stats_cache=cache)  # type: ignore[arg-type]
        h, tokens = ctx.statistics(gm, [req])[req]
        assert tokens == 3 * 2 * 64
        return h.double()

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        xs = [torch.relu(gm.up(b[0])).reshape(-1, 48) for b in batches]
    assert all(x.dtype == torch.bfloat16 for x in xs)
    per_batch = [x.double().t() @ x.double() for x in xs]
    exact_of_bf16 = sum(per_batch)
    h_fp32, h_bf16 = hessian("float32"), hessian("bfloat16")
    assert torch.equal(hessian("bfloat16"), h_bf16) and torch.equal(hessian("float32"), h_fp32)  # (cache hits)
    scale = float(exact_of_bf16.abs().max())
    # each entry: the bf16 rounding of its batch's sum (half a unit in bf16's 8-bit significand: ≤ 2⁻⁸ of it) plus
    # the float32 accumulation of its 128 exact products (≤ 128·2⁻²⁴ of their absolute sum, |x|ᵀ|x|)
    bound = sum(h.abs() * 2.0**-8 + (x.double().abs().t() @ x.double().abs()) * 128 * 2.0**-24
                for h, x in zip(per_batch, xs, strict=True))
    assert bool(((h_bf16 - exact_of_bf16).abs() <= bound).all())
    assert float((h_bf16 - exact_of_bf16).abs().max()) > 64 * 2.0**-24 * scale  # not float32's product
    gap = float((h_bf16 - h_fp32).abs().max()) / scale
    assert 2.0**-20 < gap < 4 * BF16_EPS  # bf16 ran (not float32), and its rounding is all that changed


def test_gptq_on_a_block_with_bfloat16_forwards_gives_a_grid_as_good(tiny_llama):
    """GPTQ fitted to bf16-forward statistics: the block's outputs stay as close to the float block's as with float32
    forwards (within a few bf16 roundings of the block output's own error), and the block outputs GPTQ hands to the
    driver are the bf16 forward's (close to the float32 forward of the same quantized graph)."""
    from qcompiler.pm.manager import PassManager
    from qcompiler.pm.pipeline import parse_pipeline

    gm0, inputs = traced_block(tiny_llama, n_batches=2)
    with torch.no_grad():
        ref = torch.cat([gm0(*a) for a in inputs])
    errors = {}
    for precision in ("float32", "bfloat16"):
        gm, _ = traced_block(tiny_llama, n_batches=2)
        ctx = context(inputs, get_scheme("w4a16", group_size=32))
        ctx.forward_precision = precision  # type: ignore[assignment]
        gm = PassManager(parse_pipeline("fuse_linears,gptq")).run(gm, ctx)
        with torch.no_grad():
            out = torch.cat([gm(*a) for a in inputs])
        errors[precision] = float((out - ref).norm() / ref.norm())
        assert ctx.block_outputs is not None  # (the staged runs' outputs: what the driver propagates)
        staged = torch.cat(ctx.block_outputs)
        assert float((staged - out).norm() / out.norm()) < (4 * BF16_EPS if precision == "bfloat16" else 1e-6)
    assert errors["bfloat16"] < 1.5 * errors["float32"] + 4 * BF16_EPS, errors


def test_the_run_records_its_forward_precision(tiny_llama, tmp_path, calib_text):
    cfg = QuantizeConfig(model=tiny_llama, scheme=get_scheme("w4a16", group_size=32), out=tmp_path / "out",
                         algo="gptq", calib_texts=[calib_text], num_samples=4, seq_len=48, batch_size=2,
                         progress=False, calib_precision="bfloat16")
    logs: list[str] = []
    desc = quantize(cfg, log=logs.append)
    assert desc["calibration"]["forward_precision"] == "bfloat16"
    assert json.loads((tmp_path / "out" / "qcompiler.json").read_text())["calibration"]["forward_precision"] == "bfloat16"
    assert any("forwards in bfloat16" in line for line in logs)


def test_cli_passes_the_precision_through(tiny_llama, tmp_path, calib_text):
    from qcompiler.cli import main

    (tmp_path / "calib.txt").write_text(calib_text)
    args = ["quant", "--model", str(tiny_llama), "--scheme", "w8a16", "--out", str(tmp_path / "out"), "--calib-text",
            str(tmp_path / "calib.txt"), "--num-samples", "2", "--seq-len", "32", "--no-progress"]
    assert main([*args, "--calib-precision", "bfloat16"]) == 0
    desc = json.loads((tmp_path / "out" / "qcompiler.json").read_text())
    assert desc["calibration"]["forward_precision"] == "bfloat16"
    assert main([*args[:6], str(tmp_path / "default"), *args[7:]]) == 0  # (float32 unless asked)
    assert json.loads((tmp_path / "default" / "qcompiler.json").read_text())["calibration"]["forward_precision"] == (
        "float32")
