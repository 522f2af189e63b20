"""Fused transformer blocks (ditq.blocks): the norm emits the next GEMM's int8 input; outputs equal the unfused
quantized model, fewer ops run, and whatever the fused forward does not cover falls back to diffusers' own."""
import copy

import pytest
import torch

import ditq
from ditq import backends
from ditq.blocks import fuse_blocks, fused_block_class
from ditq.fuse import fuse_projections
from ditq.quant import reference as ref
from test_fuse import CountOps
from tiny_models import tiny_family


def _out(o):
    return o.sample if hasattr(o, "sample") else o[0]


def _quantized(family, preset="w8a8", backend="torch", **kw):
    model, inputs = tiny_family(family)
    ditq.quantize(model, ditq.QuantConfig.preset(preset, backend=backend, progress=False, **kw),
                  calib_fn=lambda m: m(**inputs))
    fuse_projections(model)
    return model, inputs


def _ops(model, inputs):
    with torch.no_grad(), CountOps() as c:
        _out(model(**inputs))
    return sum(c.ops.values()), c.ops


def _fused_kernels_missing(backend):
    """None when ``backend`` runs here with the fused norm and GEMM epilogue kernels, else why not."""
    why = backends.unavailable_reason(backend, "cpu")
    if why is None:
        ops = backends.get_backend(backend, "cpu").kernel_ops()
        if ops.norm_modulate_quantize is None or ops.gemm_w8a8_fused is None:
            why = f"backend {backend} has no fused norm / GEMM epilogue kernels"
    return why




# each family, format and activation scheme twice over, in four models (the suite's time budget); the SD3.5-like
# models (SD3 with q/k RMSNorms; SD3.5-medium-like with the dual attention) once each (static W8A8: test_op_counts)
CASES = [("dit", "w8a8", "static"), ("dit", "w4a8", "dynamic"), ("pixart", "w8a8", "dynamic"),
         ("pixart", "w4a8", "static"), ("flux", "w8a8", "dynamic"), ("flux", "w4a8", "static"),
         ("sd3", "w8a8", "static"), ("sd3", "w4a8", "dynamic"), ("sd35", "w8a8", "dynamic"),
         ("sd35m", "w4a8", "dynamic")]
# fused norms per forward: DiT and PixArt 2 per block; FLUX 4 in its joint block (both streams) + 1 in its single
# one; SD3 (and SD3.5-like, with q/k RMSNorms) 4 + 3 (its last block's context stream only feeds k/v: no context MLP);
# SD3.5-medium-like one more in its dual-attention block (attn2's input)
NORMS = {"dit": 4, "pixart": 4, "flux": 5, "sd3": 7, "sd35": 7, "sd35m": 8}
# LayerNorms the fused norms replace: one each, but in a dual-attention block diffusers' norm1 runs one LayerNorm
# for both attentions' modulations, which the fused block normalizes in each attention's fused norm
LAYER_NORMS = {**NORMS, "sd35m": 7}


# The kernel backends run the same contracts as torch (each kernel is exact against the reference in its own
# tests): under the Triton interpreter (60-120 s per model) and the emulator two models each are enough to show
# the fused blocks reach their fused kernels and match; torch runs every case.
KERNEL_BACKEND_CASES = {("dit", "w8a8", "static"), ("flux", "w4a8", "static")}
BLOCK_PARAMS = [pytest.param(*case, backend, id=f"{'-'.join(case)}-{backend}",
                             marks=() if backend == "torch" else pytest.mark.slow)
                for case in CASES for backend in ("torch", "triton", "cuda-emulated")
                if backend == "torch" or case in KERNEL_BACKEND_CASES]


@pytest.mark.parametrize("family,preset,act_scheme,backend", BLOCK_PARAMS)
def test_fused_blocks_equal_the_unfused_quantized_model(family, preset, act_scheme, backend):
    if _fused_kernels_missing(backend):
        pytest.skip(_fused_kernels_missing(backend))
    kw = {"group_size": 32} if preset == "w4a8" else {}
    model, inputs = _quantized(family, preset, backend=backend, act_scheme=act_scheme, **kw)
    unfused = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = fuse_blocks(model)
    assert report and all(why is None for why in report.values()), report
    assert all(type(model.get_submodule(n)).__name__.startswith("Fused") for n in report)
    assert model.state_dict().keys() == state.keys()  # checkpoints do not see the fusion
    with torch.no_grad():
        y_ref, y = _out(unfused(**inputs)), _out(model(**inputs))
    if backend == "torch":
        # the same integer GEMMs and the same fp32 epilogue order: equal to fp32 rounding (the fused norm sums in
        # its own order, which could move an int8 value at an exact rounding tie; these inputs have none)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    else:  # GELU's tanh differs in its last bits from torch's, which can move an int8 value at a boundary
        assert ditq.sqnr(y_ref, y) > 60
    n_ref, ops_ref = _ops(unfused, inputs)
    n, ops = _ops(model, inputs)
    blocks = len(report)
    prefix = "ditq_C::" if backend.startswith("cuda") else f"ditq::{backend}_"  # the C++ ops' own namespace
    assert ops[f"{prefix}norm_modulate_quantize"] == NORMS[family]
    assert ops[f"{prefix}gemm_{preset}_fused"] >= 4 * blocks  # q/k/v, output projection(s), MLP at least
    assert ops.get("native_layer_norm", 0) == ops_ref.get("native_layer_norm", 0) - LAYER_NORMS[family]
    assert n < n_ref
    print(f"{family} {preset} {act_scheme} {backend}: ops {n_ref} -> {n}")


def test_norm_modulate_quantize_is_layernorm_modulate_quantize():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 96, generator=g) * 3 + 1
    shift, scale = torch.randn(2, 96, generator=g), torch.randn(2, 96, generator=g) * 0.2
    y = torch.nn.functional.layer_norm(x, (96,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    for act_scale in (None, torch.tensor([0.03])):
        q, s = torch.ops.ditq.norm_modulate_quantize(x, shift, scale, 1e-6, act_scale, "torch")
        q_ref, s_ref = (ref.quantize_per_token(y.reshape(-1, 96)) if act_scale is None else
                        (ref.quantize_with_scale(y.reshape(-1, 96), act_scale, 127), act_scale))
        assert (q.int() - q_ref.int()).abs().max() <= 1 and (q != q_ref).float().mean() < 1e-3
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)


def test_uncovered_calls_and_backends_fall_back():
    model, inputs = _quantized("dit")
    block = model.transformer_blocks[0]
    fuse_blocks(model)
    plain = super(type(block), block).forward
    x = torch.randn(2, 16, 64)
    mask = torch.zeros(2, 16)
    kwargs = dict(timestep=inputs["timestep"], class_labels=inputs["class_labels"])
    with torch.no_grad():  # an attention mask: the diffusers forward runs
        torch.testing.assert_close(block(x, attention_mask=mask, **kwargs), plain(x, attention_mask=mask, **kwargs),
                                   rtol=0, atol=0)
    if backends.unavailable_reason("cuda-emulated", "cpu") is None:
        with torch.no_grad():  # moved onto another backend: its fused norm kernel (csrc/norm_quantize.cuh) runs
            y = block(x, **kwargs)
            for layer in (block.attn1.to_qkv, block.ff.net[0].proj):
                layer.set_backend("cuda-emulated")
            assert ditq.sqnr(y, block(x, **kwargs)) > 60
        emulated, inputs = _quantized("dit", backend="cuda-emulated")
        unfused = copy.deepcopy(emulated)
        report = fuse_blocks(emulated)
        assert report and all(why is None for why in report.values()), report
        with torch.no_grad():
            assert ditq.sqnr(_out(unfused(**inputs)), _out(emulated(**inputs))) > 60


def test_timestep_grouped_scales_run_fused():
    base, inputs = tiny_family("dit")
    outs = {}
    for fuse in (False, True):
        model = copy.deepcopy(base)

        def calib(m):
            for t in (999, 600, 300, 10):
                m(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)})
        report = ditq.quantize(model, ditq.QuantConfig.preset("w8a8", backend="torch", calibration="all-steps",
                                                              timestep_groups=2, fuse=fuse, progress=False),
                               calib_fn=calib)
        if fuse:
            assert all(why is None for why in report.fusion["blocks"].values()), report.fusion
        with torch.no_grad():
            outs[fuse] = [_out(model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)}))
                          for t in (999, 10)]
    qkv = model.transformer_blocks[0].attn1.to_qkv
    assert qkv.act_scales.numel() == 2 and not torch.equal(qkv.act_scales[0], qkv.act_scales[1])
    for a, b in zip(outs[False], outs[True]):  # each step ran with its own group's scale, fused or not
        assert ditq.sqnr(a, b) > 60


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_quantized_embedders_run_fused(preset):
    """Timestep embedders quantized on request (``include``; the default keeps them float): the fused DiT runs them
    as fused GEMMs (the projection quantized once, the label embedding in linear_2's epilogue) and equals the
    unfused quantized model to fp32 rounding."""
    kw = {"group_size": 32} if preset == "w4a8" else {}
    include = ["*timestep_embedder*", "*norm1.linear", "*attn1.to_*", "*ff.net*"]
    model, inputs = _quantized("dit", preset, include=include, **kw)
    assert isinstance(model.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1, ditq.nn.QuantLinear)
    unfused = copy.deepcopy(model)
    assert all(why is None for why in fuse_blocks(model).values())
    assert model._ditq_dit_plan["quantized_embedders"]
    with torch.no_grad():
        torch.testing.assert_close(_out(model(**inputs)), _out(unfused(**inputs)), rtol=1e-5, atol=1e-5)
    _, ops = _ops(model, inputs)
    assert ops[f"ditq::torch_gemm_{preset}_fused"] == 14  # 5 per block, and each block's linear_1 and linear_2


def test_dynamic_activations_run_fused():
    """Per-token scales: the fused norm emits them itself; equal to the unfused model to fp32 rounding."""
    model, inputs = _quantized("dit", act_scheme="dynamic")
    unfused = copy.deepcopy(model)
    assert all(why is None for why in fuse_blocks(model).values())
    with torch.no_grad():
        torch.testing.assert_close(_out(model(**inputs)), _out(unfused(**inputs)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_backend_without_fused_epilogue_runs_the_plain_gemm_and_the_torch_epilogue(preset):
    """QuantLinear.forward_fused on a backend whose kernels lack the fused epilogue: the plain GEMM in fp32, then
    the contract's epilogue in torch; the same numbers, and the same refusal of a bad argument."""
    kw = {"group_size": 32} if preset == "w4a8" else {}
    model, inputs = _quantized("dit", preset, **kw)
    fuse_blocks(model)
    with torch.no_grad():
        y_ref = _out(model(**inputs))
    layers = [m for m in model.modules() if isinstance(m, ditq.nn.QuantLinear)]
    fused_kernels = layers[0]._kernels
    for layer in layers:
        layer._kernels = layer._kernels._replace(gemm_w8a8_fused=None, gemm_w4a8_fused=None)
    n, ops = _ops(model, inputs)
    assert not [k for k in ops if "fused" in k] and ops[f"ditq::torch_norm_modulate_quantize"] == 4, ops
    with torch.no_grad():
        torch.testing.assert_close(_out(model(**inputs)), y_ref, rtol=1e-5, atol=1e-5)
    fc2 = model.transformer_blocks[0].ff.net[2]
    q, s = torch.zeros(6, fc2.in_features, dtype=torch.int8), torch.ones(1)
    for kernels in (fc2._kernels, fused_kernels):  # fallback, then the backend's fused kernel
        fc2._kernels = kernels
        with pytest.raises(ValueError, match=r"gate must be \[M // rows_per_gate, N\]"):
            fc2.forward_fused(q, s, torch.float32, gate=torch.ones(2, 5), rows_per_gate=3)


def test_pixart_text_padding_mask_runs_fused():
    """PixArt pipelines pass the prompt's padding mask to the cross-attention: the fused block applies it as
    diffusers does (bit for bit here) instead of falling back."""
    model, inputs = _quantized("pixart")
    mask = torch.ones(2, 6)
    mask[0, 4:], mask[1, 2:] = 0, 0
    inputs = {**inputs, "encoder_attention_mask": mask}
    unfused = copy.deepcopy(model)
    fuse_blocks(model)
    n, ops = _ops(model, inputs)
    assert ops["ditq::torch_norm_modulate_quantize"] == 4  # the fused forward ran
    with torch.no_grad():
        y = _out(model(**inputs))
        torch.testing.assert_close(y, _out(unfused(**inputs)), rtol=1e-5, atol=1e-5)
        assert (y - _out(model(**{k: v for k, v in inputs.items() if k != "encoder_attention_mask"}))).abs().max() \
            > 1e-3  # the mask matters on these inputs
