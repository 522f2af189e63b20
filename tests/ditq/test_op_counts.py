"""What a fused quantized model dispatches (counted with a TorchDispatchMode over one transformer forward): the
op-count targets per family, and a count per kernel op that fails if a fusion silently falls back to the plain ops.

Counts of aten ops are upper bounds (a newer diffusers or torch may dispatch a view fewer); counts of ditq ops are
exact: they are what the fused forward launches."""
import copy

import pytest
import torch

import ditq
from ditq import backends
from ditq.blocks import fuse_blocks
from ditq.fuse import fuse_projections
from test_fuse import CountOps
from tiny_models import FAMILIES, dit_inputs, tiny_dit


def _has_fused_kernels(backend: str):
    """None when ``backend`` runs here and has the fused norm and GEMM epilogue kernels, else why not."""
    why = backends.unavailable_reason(backend, "cpu")
    if why is None:
        ops = backends.get_backend(backend, "cpu").kernel_ops()
        if ops.norm_modulate_quantize is None or ops.gemm_w8a8_fused is None:
            why = f"backend {backend} has no fused norm / GEMM epilogue kernels"
    return why


def _tied_dit():
    """A tiny DiT whose blocks hold one embedder, as DiT checkpoints converted from the original do (its single
    t_embedder / y_embedder copied into every block)."""
    model = tiny_dit(seed=0)
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model, dit_inputs(batch=2, seed=1)


def _model(family):
    if family == "dit":
        return tiny_dit(seed=0), dit_inputs(batch=2, seed=1)
    if family == "dit-tied":
        return _tied_dit()
    return FAMILIES[family]()


def _count(model, inputs):
    with torch.no_grad(), CountOps() as c:
        out = model(**inputs)
    return c, (out.sample if hasattr(out, "sample") else out[0])


def _counts(family, backend="torch", act_scheme="static"):
    """(fp32, quantized, fused) CountOps of one forward, and the fused and unfused outputs."""
    model, inputs = _model(family)
    fp32, _ = _count(model, inputs)
    ditq.quantize(model, ditq.QuantConfig.preset("w8a8", backend=backend, act_scheme=act_scheme, progress=False),
                  calib_fn=lambda m: m(**inputs))
    quantized, y_ref = _count(model, inputs)
    fuse_projections(model)
    report = fuse_blocks(model)
    assert all(why is None for why in report.values()), report
    fused, y = _count(model, inputs)
    return fp32, quantized, fused, y_ref, y


def _total(c) -> int:
    return sum(c.ops.values())


# family -> (most aten + ditq ops the fused forward may dispatch, exact ditq ops by kernel) with static W8A8 on the
# torch backend; the tiny models have 2 blocks (FLUX: 1 joint + 1 single). The timestep embedders stay in float
# (ditq.convert.DEFAULT_SKIP), and every adaLN GEMM quantizes its float input on load (ditq.blocks.quantizes_on_load).
# DiT, per block: norm (2), q/k/v, to_out, fc1, fc2 and the adaLN linear as fused GEMMs (5), the attention output's
# quantize_act (1): 8 ditq ops per block, its embedder included (it runs in float, once per distinct embedder).
FUSED = {
    "dit": (86, {"norm_modulate_quantize": 4, "gemm_w8a8_fused": 10, "quantize_act": 2}),
    "dit-tied": (78, {"norm_modulate_quantize": 4, "gemm_w8a8_fused": 10, "quantize_act": 2}),
    # PixArt: the cross-attention adds to_q, to_kv (fused), to_out and their three quantize_act per block; the
    # transformer's adaLN-single linear (one plain GEMM and its quantize_act) runs as diffusers has it
    "pixart": (122, {"norm_modulate_quantize": 4, "gemm_w8a8_fused": 14, "quantize_act": 9, "gemm_w8a8": 1}),
    # FLUX (ditq.blocks_joint): joint block 10 fused GEMMs (2 adaLN, 2 q/k/v, 2 output projections, 2 MLPs),
    # single block 4 (adaLN, q/k/v, proj_mlp emitting proj_out's int8 input, proj_out); one quantize_act per
    # attention output; one attention_inputs per block (q/k RMSNorms, rope, concatenation: 259 ops before it, 93 ->
    # 45 in the joint block, 61 -> 29 in the single one); the transformer's x_embedder as diffusers has it (a plain
    # GEMM and its quantize_act)
    "flux": (179, {"norm_modulate_quantize": 5, "gemm_w8a8_fused": 14, "quantize_act": 4, "gemm_w8a8": 1,
                   "attention_inputs": 2}),
    # SD3 (ditq.blocks_joint): as FLUX's joint block; the last block's context stream only feeds k/v (no to_add_out,
    # no context MLP); attention_inputs replaces the streams' concatenation and permute (127 ops before it)
    "sd3": (125, {"norm_modulate_quantize": 7, "gemm_w8a8_fused": 17, "quantize_act": 3, "attention_inputs": 2}),
    # SD3.5-large-like (q/k RMSNorms): the same ops, the norms inside attention_inputs (before it, the blocks ran
    # diffusers' forward)
    "sd35": (125, {"norm_modulate_quantize": 7, "gemm_w8a8_fused": 17, "quantize_act": 3, "attention_inputs": 2}),
    # SD3.5-medium-like (dual attention in block 0): attn2 adds a fused norm (its own modulation of the block's
    # input), its q/k/v and to_out GEMMs, one attention_inputs (one stream) and one quantize_act (258 ops while the
    # dual block ran diffusers' forward)
    "sd35m": (135, {"norm_modulate_quantize": 8, "gemm_w8a8_fused": 19, "quantize_act": 4, "attention_inputs": 3}),
}
DIT_BLOCKS = 2


@pytest.mark.parametrize("family", sorted(FUSED))
def test_fused_op_counts(family):
    fp32, quantized, fused, y_ref, y = _counts(family)
    most, kernels = FUSED[family]
    got = {name.split("::torch_", 1)[1]: n for name, n in fused.ops.items() if name.startswith("ditq::")}
    assert got == kernels, got  # a fusion that fell back to the plain ops changes these
    assert _total(fused) <= most, (_total(fused), fused.ops)
    if family.startswith("dit"):  # the targets: at most 60% of the float model's ops, 8 ditq ops per block
        assert _total(fused) <= 0.6 * _total(fp32), (_total(fused), _total(fp32))
        assert fused.ditq() <= 8 * DIT_BLOCKS, fused.ops
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    print(f"{family}: all ops fp32 {_total(fp32)}, quantized {_total(quantized)}, fused {_total(fused)}; "
          f"ditq ops quantized {quantized.ditq()}, fused {fused.ditq()}")


def test_dynamic_scales_count_one_quantize_per_gemm_input():
    """Per-token scales: fc1 cannot emit fc2's int8 input (its scale is the row's), and the adaLN GEMM cannot
    quantize its input on load (a per-token scale needs the whole row first), so each is quantized by its own op:
    four quantize_act more than static for the 2-block DiT, nothing else changes."""
    _, _, fused, y_ref, y = _counts("dit", act_scheme="dynamic")
    got = {name.split("::torch_", 1)[1]: n for name, n in fused.ops.items() if name.startswith("ditq::")}
    assert got == {"norm_modulate_quantize": 4, "gemm_w8a8_fused": 10, "quantize_act": 6}, got
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fused_dit_op_counts_on_triton():
    why = _has_fused_kernels("triton")
    if why is not None:
        pytest.skip(why)
    fp32, _, fused, y_ref, y = _counts("dit", backend="triton")
    got = {name.split("::triton_", 1)[1]: n for name, n in fused.ops.items() if name.startswith("ditq::")}
    assert got == FUSED["dit"][1], got
    assert _total(fused) <= 0.6 * _total(fp32)
    assert ditq.sqnr(y_ref, y) > 60  # GELU's tanh differs in its last bits between Triton and torch


@pytest.mark.slow
def test_fused_dit_op_counts_on_cuda_emulated():
    """The CUDA kernels (emulated) launch what the torch backend does: the adaLN GEMM quantizes its float input
    on load there too (csrc/gemm_fused_float_a.cu), so no quantize_act is added for it."""
    why = _has_fused_kernels("cuda-emulated")
    if why is not None:
        pytest.skip(why)
    fp32, _, fused, y_ref, y = _counts("dit", backend="cuda-emulated")
    got = {name.split("::", 1)[1]: n for name, n in fused.ops.items() if name.startswith("ditq")}
    assert got == FUSED["dit"][1], got
    assert fused.ditq() <= 8 * DIT_BLOCKS, fused.ops
    assert ditq.sqnr(y_ref, y) > 60  # GELU's expf differs in its last bits between the host libm and torch


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_compiled_fused_model_has_no_graph_break(family):
    """torch.compile(fullgraph=True) traces the fused forward (DiT: the instance's own forward; the fused kernels'
    fake implementations) into one graph that runs the fused ops."""
    from torch._dynamo.backends.registry import lookup_backend

    model, inputs = _model(family)
    ditq.quantize(model, ditq.QuantConfig.preset("w8a8", backend="torch", fuse=True, progress=False),
                  calib_fn=lambda m: m(**inputs))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=record)
    with torch.no_grad():
        eager = model(**inputs)[0]
        traced = compiled(**inputs)[0]
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    kernels = FUSED[family][1]
    assert sum("torch_gemm_w8a8_fused" in t for t in targets) == kernels["gemm_w8a8_fused"], targets
    assert sum("torch_norm_modulate_quantize" in t for t in targets) == kernels["norm_modulate_quantize"], targets
    assert sum("torch_attention_inputs" in t for t in targets) == kernels.get("attention_inputs", 0), targets


def test_equal_embedders_are_computed_once():
    """The tied DiT computes its one embedder once and quantizes the adaLN input once for both blocks; the untied
    one computes each block's; both equal their unfused models (above). Unequal embedders are never merged."""
    model, inputs = _tied_dit()
    ditq.quantize(model, ditq.QuantConfig.preset("w8a8", backend="torch", fuse=True, progress=False),
                  calib_fn=lambda m: m(**inputs))
    assert model._ditq_dit_plan["owners"] == [0, 0]
    other = copy.deepcopy(model)
    with torch.no_grad():  # one changed label row: block 1's embedder now differs
        other.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[0] += 1
    fuse_blocks(other)
    assert other._ditq_dit_plan["owners"] == [0, 1]
    model.load_state_dict(other.state_dict())  # new weights into a fused model: it plans again
    assert model._ditq_dit_plan["owners"] == [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, other(**inputs).sample, rtol=0, atol=0)
