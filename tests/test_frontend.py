import pytest
import torch
from blocks import traced_block
from tiny import FAMILIES

from qcompiler.errors import ModelLoadError, TraceError
from qcompiler.frontends.hf import (
    BlockAdapter,
    BlockCall,
    Checkpoint,
    attention_implementation,
    build_skeleton,
    capture_block_inputs,
    trace_block,
)
from qcompiler.ir.analysis import analyze_block


@pytest.mark.parametrize("family", FAMILIES)
def test_block_graph_equals_the_module_and_roles_come_from_the_graph(tiny_models, family):
    from transformers import AutoModelForCausalLM

    gm, inputs = traced_block(tiny_models[family])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_models[family]))
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_models[family]), dtype=torch.float32,
                                               attn_implementation=attention_implementation(config)).eval()
    captured = capture_block_inputs(ref, [torch.randint(3, 250, (3, 29), generator=torch.Generator().manual_seed(0))])
    ref_inputs = captured.of_block(0)
    with torch.no_grad():
        expect = BlockAdapter(ref.model.layers[0], captured.calls[0])(*ref_inputs[0])
        got = gm(*ref_inputs[0])  # a different batch and length than traced: dims are dynamic
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)

    a = analyze_block(gm)
    roles = sorted(li.role for li in a.linears.values())
    assert roles == sorted(["q", "k", "v", "o", "gate", "up", "down"])
    assert {li.path for li in a.by_role("k")} == {"self_attn.k_proj"}  # the name only reports, never decides
    assert len(a.attention) == 1
    groups = sorted(sorted(a.linears[n].role for n in g.linears) for g in a.norm_groups)
    assert groups == [["gate", "up"], ["k", "q", "v"]]
    if family == "gemma":
        assert all(g.offset == 1.0 for g in a.norm_groups)  # Gemma's norm multiplies by (1 + γ)
    else:
        assert all(g.offset == 0.0 for g in a.norm_groups)
    assert sorted(len(g) for g in a.shared_input_groups) == [2, 3]


def test_missing_and_bad_model_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        Checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        Checkpoint(tmp_path / "empty")


def test_unknown_architecture_is_refused(tiny_llama, tmp_path):
    import json
    import shutil

    d = tmp_path / "weird"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "vit"
    cfg["architectures"] = ["ViTModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="neither a causal language model nor a vision-language model"):
        build_skeleton(Checkpoint(d))


class DataDependentBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        if self.lin(x).sum() > 0:  # data-dependent Python control flow cannot be exported
            return x
        return -x


def test_untraceable_block_error_names_block_and_op():
    import torch.utils._pytree as pytree

    _, spec = pytree.tree_flatten({})
    with pytest.raises(TraceError, match="model.layers.7") as e:
        trace_block(DataDependentBlock(), BlockCall(keys=(), spec=spec), (torch.randn(2, 17, 8),), "model.layers.7")
    assert e.value.block == "model.layers.7" and e.value.op


def test_roles_with_eager_attention_matmul_softmax_matmul():
    """Without SDPA the graph has matmul(q, kᵀ) → softmax → matmul(p, v); the roles are found the same."""
    from tiny import tiny_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    captured = capture_block_inputs(model, [torch.randint(3, 250, (2, 17), generator=torch.Generator().manual_seed(0))])
    gm = trace_block(model.model.layers[0].to("meta"), captured.calls[0], captured.of_block(0)[0], "model.layers.0")
    assert not any("scaled_dot_product" in str(n.target) for n in gm.graph.nodes)
    a = analyze_block(gm)
    assert sorted(li.role for li in a.linears.values()) == sorted(["q", "k", "v", "o", "gate", "up", "down"])
    by_role = {li.role: li.path for li in a.linears.values()}
    assert (by_role["q"], by_role["k"], by_role["v"], by_role["o"]) == (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def test_checkpoint_release_keeps_tensors_already_read_valid(tiny_llama):
    ckpt = Checkpoint(tiny_llama)
    name = "model.layers.1.mlp.up_proj.weight"
    t = ckpt.tensor(name)
    copy = t.clone()
    ckpt.release()
    import gc

    gc.collect()
    assert torch.equal(t, copy)  # still readable after the memory maps are closed
    assert torch.equal(ckpt.tensor(name), copy)  # and the checkpoint reopens lazily


def test_positional_block_inputs_are_bound_by_name_and_unseen_tensors_refused():
    """A model may pass a block's inputs by position (Falcon: `alibi` second); the block's signature names them.
    A tensor input the traced block never saw is refused, never dropped."""
    from qcompiler.frontends.hf import block_arguments, flatten_block_kwargs

    class Block(torch.nn.Module):
        def forward(self, hidden_states, alibi, attention_mask=None, position_ids=None):
            return hidden_states

    h, mask = torch.zeros(1, 3, 4), torch.ones(1, 1, 3, 3)
    hidden, named = block_arguments(Block(), (h, None, mask), {"position_ids": torch.arange(3)})
    assert hidden is h and named["alibi"] is None and named["attention_mask"] is mask and "position_ids" in named
    call = BlockCall(keys=("attention_mask",), spec=torch.utils._pytree.tree_flatten({"attention_mask": mask})[1])
    assert flatten_block_kwargs(call, {"attention_mask": mask})[0] is mask
    with pytest.raises(ModelLoadError, match=r"\['position_ids'\] that the block was traced without"):
        flatten_block_kwargs(call, {"attention_mask": mask, "position_ids": torch.arange(3)})
