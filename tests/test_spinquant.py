"""rotate{learn=N} (SpinQuant's R1, algorithms/spinquant.py): the Cayley parametrization, the trained model being
the float model when nothing is quantized, training lowering the quantized loss, the driver using one learned R in
the blocks and outside them, the state file checked, refusals by name."""

import pytest
import torch
from safetensors.torch import save_file
from tiny import make_tiny_model

from qcompiler.algorithms.hadamard import random_hadamard
from qcompiler.algorithms.spinquant import (
    QuantizedRotatedModel,
    cayley,
    layout_refusal,
    learn_rotation,
    read_rotation,
    straight_through,
)
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import ArtifactError, PassError, PipelineError, SchemeError
from qcompiler.frontends.hf import find_blocks
from qcompiler.pm.pipeline import parse_pipeline
from qcompiler.runtime import load_quantized
from qcompiler.schemes import get_scheme


def _float_model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def _quantize(model, out, scheme, text, passes):
    cfg = QuantizeConfig(model=model, scheme=get_scheme(scheme), out=out, calib_texts=[text], num_samples=4,
                         seq_len=32, batch_size=2, progress=False, passes=parse_pipeline(passes))
    return quantize(cfg, log=lambda s: None)


def test_cayley_is_orthogonal_and_quantization_is_straight_through():
    b = torch.randn(24, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = cayley(b)
    assert torch.allclose(c.t() @ c, torch.eye(24, dtype=torch.float64), atol=1e-12)
    assert torch.equal(cayley(torch.zeros(5, 5)), torch.eye(5))
    x = torch.linspace(-1, 1, 7, requires_grad=True)
    y = straight_through(x, torch.round(x.detach() * 2) / 2)
    (y * torch.arange(7.0)).sum().backward()
    assert torch.equal(y.detach(), torch.round(x.detach() * 2) / 2) and torch.equal(x.grad, torch.arange(7.0))


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_the_rotated_model_without_quantization_is_the_float_model(tmp_path, family):
    """For any orthogonal R the trained model computes the float model: only quantization error is left to learn
    (gemma checks the folded 1 + γ multipliers). float32 through a dozen rotated products: relative error ~1e-6."""
    model = _float_model(make_tiny_model(tmp_path / "m", family))
    prefix, layers = find_blocks(model)
    ids = torch.randint(3, 250, (2, 32), generator=torch.Generator().manual_seed(1))
    ref = float(model(ids, labels=ids).loss)
    qmodel = QuantizedRotatedModel(model, prefix, layers, None, None)
    b = 0.1 * torch.randn(96, 96, generator=torch.Generator().manual_seed(2))
    r = random_hadamard(96, 0)[0].float() @ cayley(b)
    with torch.no_grad():
        assert abs(float(qmodel.loss(ids, r)) - ref) < 1e-5 * ref
        quantized = float(QuantizedRotatedModel(model, prefix, layers, get_scheme("w4a4").weights,
                                                get_scheme("w4a4").activations).loss(ids, r))
    assert quantized > ref  # (and the quantized model is not: int4 weights and activations lose information)


def test_learning_lowers_the_quantized_loss(tmp_path):
    model = _float_model(make_tiny_model(tmp_path / "m", "llama"))
    prefix, layers = find_blocks(model)
    w4a4 = get_scheme("w4a4")
    qmodel = QuantizedRotatedModel(model, prefix, layers, w4a4.weights, w4a4.activations, clip_grid=4)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(3, 250, (1, 32), generator=g) for _ in range(2)]
    r0 = random_hadamard(96, 0)[0]
    r, losses = learn_rotation(qmodel, batches, r0, steps=12, lr=1e-2)
    assert len(losses) == 12 and r.dtype == torch.float64
    assert torch.allclose(r.t() @ r, torch.eye(96, dtype=torch.float64), atol=1e-10)

    def mean_loss(rot):
        with torch.no_grad():
            return sum(float(qmodel.loss(x, rot.float())) for x in batches) / len(batches)

    assert mean_loss(r) < mean_loss(r0)


def test_the_driver_uses_one_learned_rotation_in_the_blocks_and_outside(tmp_path, calib_text):
    """w4a4's activations train R (so it moves from R₀), but no pass quantizes: the artefact must compute the float
    model, which it does only if the embeddings, every block and the head were rotated by the same R."""
    model = make_tiny_model(tmp_path / "m", "llama")
    desc = _quantize(model, tmp_path / "learned", "w4a4", calib_text, "rotate{learn=3,lr=0.01}")
    assert desc["pipeline"].startswith("rotate{learn=3,lr=0.01}")
    _quantize(model, tmp_path / "hadamard", "w4a4", calib_text, "rotate")
    ids = torch.randint(3, 250, (2, 32), generator=torch.Generator().manual_seed(4))
    ref = _float_model(model)(ids).logits
    learned, hadamard = load_quantized(tmp_path / "learned"), load_quantized(tmp_path / "hadamard")
    assert float((learned(ids).logits - ref).norm() / ref.norm()) < 1e-5
    e_learned, e_hadamard = learned.get_input_embeddings().weight, hadamard.get_input_embeddings().weight
    assert float((e_learned - e_hadamard).norm() / e_hadamard.norm()) > 1e-3  # (R ≠ R₀)


def test_refusals_name_the_reason(tmp_path, tiny_llama, calib_text):
    with pytest.raises(SchemeError, match="per-token"):
        _quantize(tiny_llama, tmp_path / "static", "w8a8", calib_text, "rotate{learn=2},rtn,act_quant")
    assert not (tmp_path / "static").exists() and not (tmp_path / ".static.partial").exists()
    gemma2 = make_tiny_model(tmp_path / "g2", "gemma2")
    with pytest.raises(PipelineError, match="rotate\\{learn=...\\}: block"):
        _quantize(gemma2, tmp_path / "g2out", "w4a4", calib_text, "rotate{learn=2},rtn,act_quant")
    assert not any(tmp_path.glob("*g2out*"))  # (refused before the work folder is made)
    layers = find_blocks(_float_model(gemma2))[1]
    assert "post-norms" in (layout_refusal(_float_model(gemma2), layers) or "")
    from qcompiler.passes.rotation.rotate import Rotate

    with pytest.raises(PassError, match="Hugging Face checkpoint driver"):
        Rotate(learn=2).rotation(96)  # (a pipeline run elsewhere: nothing has learned R)
    bad = tmp_path / "r.safetensors"
    save_file({"rotation": 2 * torch.eye(8, dtype=torch.float64)}, str(bad))
    with pytest.raises(ArtifactError, match="orthogonal"):
        read_rotation(bad, 8)


class _Crash(Exception):
    pass


def test_a_resumed_run_reads_the_learned_rotation_back(tmp_path, tiny_llama, calib_text, monkeypatch):
    """Killed after block 0's files: --resume reads R from the work folder (learning again could give another R
    on another machine, and the finished blocks used the first) and ends with the uninterrupted run's files."""
    import json

    from qcompiler.algorithms import spinquant
    from qcompiler.export import artifact
    from qcompiler.export.artifact import verify_manifest

    def cfg(out, **kw):
        return QuantizeConfig(model=tiny_llama, scheme=get_scheme("w4a4"), out=out, calib_texts=[calib_text],
                              num_samples=4, seq_len=32, batch_size=2, progress=False,
                              passes=parse_pipeline("rotate{learn=2,lr=0.01},fuse_linears,rtn{clip=mse}"), **kw)

    def files(out):
        verify_manifest(out)
        return {k: v["sha256"] for k, v in json.loads((out / "manifest.json").read_text())["files"].items()}

    quantize(cfg(tmp_path / "whole"), log=lambda s: None)
    real = artifact.ArtifactWriter.checkpoint

    def crash_after_first(*args, **kwargs):
        real(*args, **kwargs)
        raise _Crash

    monkeypatch.setattr(artifact.ArtifactWriter, "checkpoint", crash_after_first)
    with pytest.raises(_Crash):
        quantize(cfg(tmp_path / "out"), log=lambda s: None)
    monkeypatch.undo()
    assert (tmp_path / ".out.partial" / "state" / "learned-rotation.safetensors").is_file()

    def no_learning(*args, **kwargs):
        raise AssertionError("a resumed run learned the rotation again")

    monkeypatch.setattr(spinquant, "learn_rotation", no_learning)
    logs: list[str] = []
    desc = quantize(cfg(tmp_path / "out", resume=True), log=logs.append)
    assert desc["run"]["resumed_from_block"] == 1 and any("read back" in m for m in logs)
    assert files(tmp_path / "out") == files(tmp_path / "whole")
