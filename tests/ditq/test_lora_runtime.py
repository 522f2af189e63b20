"""Run-time LoRA on a quantized model (ditq.lora): the quantized GEMM plus a float low-rank branch, loaded, re-scaled
and unloaded without touching the packed weights. The adapters are built by hand in diffusers / peft keys, so
nothing here needs peft (the community-format check goes through diffusers' FLUX loader mixin, which needs none)."""
import copy

import pytest
import torch
from torch import nn

import ditq
from ditq import backends, lora
from ditq.nn import QuantLinear
from ditq.quant import reference as ref
from ditq.testing import assert_matches_exact

from .test_fuse import CountOps
from .tiny_models import FAMILIES, dit_inputs, tiny_dit, tiny_flux

EMULATED = backends.unavailable_reason("cuda-emulated", "cpu") is None
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2"]
DIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "proj_out_1"]


def _adapter(model, targets, rank=4, seed=0, std=0.05, prefix="transformer."):
    """A random LoRA in diffusers keys for every linear whose path ends with one of ``targets`` (float model
    paths: to_q / to_k / to_v, never the fused to_qkv). std sets B's size: 0.05 moves the tiny models' outputs
    to about 20-30 dB from the unadapted ones."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, QuantLinear)) and any(name == t or name.endswith("." + t) for t in targets):
            sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * std / rank ** 0.5
    assert sd
    return sd


def _merged(model, *adapters_and_scales):
    """The float model with the adapters merged into its weights by hand: W + scale * B A."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for sd, scale in adapters_and_scales:
            for key, a in sd.items():
                if key.endswith(".lora_A.weight"):
                    path = key[:-len(".lora_A.weight")]
                    merged.get_submodule(path.removeprefix("transformer.")).weight += \
                        scale * (sd[path + ".lora_B.weight"] @ a)
    return merged


def _quantized(model, inputs, preset="w8a8", **kw):
    q = copy.deepcopy(model)
    ditq.quantize(q, ditq.QuantConfig.preset(preset, **{"backend": "torch", "progress": False, **kw}),
                  calib_fn=lambda m: m(**inputs))
    return q


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _has_lora_state(model) -> bool:
    return any(lora.BRANCH in m._modules or "_lora_on" in m.__dict__ or
               any(h is lora._linear_hook for h in m._forward_hooks.values()) for m in model.modules())


# ---- one layer: exact against the hand-computed branch ------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch"] + (["cuda-emulated"] if EMULATED else []))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 7])
def test_layer_branch_is_the_quantized_output_plus_the_float_branch(backend, bits, m):
    """y = W_q x (the layer's own output without the adapter) + scale * (alpha / r) * (x A^T) B^T, exact up to fp32
    rounding: the K-long and r-long dot products, the alpha and scale products and the add (an fp32 sum of n terms
    is within n roundings of the magnitude), on a quantized layer and on a float nn.Linear (odd N, K a multiple
    of the group but not of 128)."""
    g = torch.Generator().manual_seed(100 * bits + m)
    k, n, n2, rank, alpha, scale = 96, 45, 33, 3, 6.0, 0.7
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    cfg = ditq.QuantConfig.preset("w8a8" if bits == 8 else "w4a8", group_size=None if bits == 8 else 32,
                                  backend=backend)
    model = nn.Sequential(QuantLinear.from_linear(lin, cfg, act_scale=torch.tensor([0.02])), nn.Linear(n, n2))
    x = torch.randn(m, k, generator=g)
    with torch.no_grad():
        y0, z0 = model[0](x), model[1](x[:, :n] * 2)
    sd = {}
    for name, (kk, nn_) in {"0": (k, n), "1": (n, n2)}.items():
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, kk, generator=g)
        sd[f"{name}.lora_B.weight"] = torch.randn(nn_, rank, generator=g) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    assert ditq.load_lora(model, sd, scale=scale) == {"0": ["0"], "1": ["1"]}
    assert type(model[1]) is nn.Linear  # the float layer keeps its class: a forward hook adds the branch
    with torch.no_grad():
        y, z = model[0](x), model[1](x[:, :n] * 2)
    for out, base, inp, name in ((y, y0, x, "0"), (z, z0, x[:, :n] * 2, "1")):
        a, b = sd[f"{name}.lora_A.weight"].double(), sd[f"{name}.lora_B.weight"].double()
        ratio = scale * alpha / rank
        exact = base.double() + ratio * (inp.double() @ a.T) @ b.T
        mag = base.double().abs() + abs(ratio) * (inp.double().abs() @ a.abs().T) @ b.abs().T
        assert_matches_exact(out, exact, mag, fp32_ops=a.shape[1] + rank + 4, what=f"layer {name} with LoRA")
    ditq.unload_lora(model)
    with torch.no_grad():
        assert torch.equal(model[0](x), y0) and torch.equal(model[1](x[:, :n] * 2), z0)
    assert not _has_lora_state(model)


@pytest.mark.parametrize("backend", ["torch"] + (["cuda-emulated"] if EMULATED else []))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("epilogue", ["none", "gelu", "gate-residual", "gelu-int8"])
def test_fused_call_adds_the_branch_before_the_epilogue(backend, bits, epilogue):
    """QuantLinear.forward_fused with an adapter loaded (how the fused blocks call their GEMMs): the epilogue
    (GELU, gate and residual, int8 output for the next layer) applies to the GEMM plus the branch, as the unfused
    layer followed by diffusers' elementwise tail computes it. Against the float64 composition, within the fp32
    roundings of the K- and r-long sums and the epilogue's (int8 output: within one step, a rounding tie)."""
    g = torch.Generator().manual_seed(10 * bits + len(epilogue))
    m, k, n, rank, scale, rows_per_gate = 6, 96, 45, 3, 0.7, 3
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=g))
    cfg = ditq.QuantConfig.preset("w8a8" if bits == 8 else "w4a8", group_size=None if bits == 8 else 32,
                                  backend=backend)
    layer = QuantLinear.from_linear(lin, cfg, act_scale=torch.tensor([0.02]))
    a, b = torch.randn(rank, k, generator=g), torch.randn(n, rank, generator=g) * 0.1
    ditq.load_lora(nn.Sequential(layer), {"0.lora_A.weight": a, "0.lora_B.weight": b}, scale=scale)
    x = torch.randn(m, k, generator=g)
    q, s = layer._kernels.quantize_act(x, layer.act_scale)
    gate = torch.randn(m // rows_per_gate, n, generator=g) if epilogue == "gate-residual" else None
    residual = torch.randn(m, n, generator=g) if epilogue == "gate-residual" else None
    out_scale = torch.tensor([0.01]) if epilogue == "gelu-int8" else None
    with torch.no_grad():
        out = layer.forward_fused(q, s, torch.float32, gelu=epilogue.startswith("gelu"), gate=gate,
                                  residual=residual, rows_per_gate=rows_per_gate, out_scale=out_scale, lora_input=x)
    c = layer.canonical()
    if bits == 8:
        exact, mag = ref.gemm_w8a8_exact(q, s, c["qweight"], c["scales"], c["bias"])
    else:
        exact, mag = ref.gemm_w4a8_exact(q, s, ref.unpack_int4(c["qweight"]), c["scales"], 32, c["bias"])
    exact = exact + scale * (x.double() @ a.double().T) @ b.double().T
    mag = mag + scale * (x.double().abs() @ a.double().abs().T) @ b.double().abs().T
    exact, mag = ref.gemm_epilogue_exact(exact, mag, epilogue.startswith("gelu"), gate, residual, rows_per_gate)
    if out_scale is None:
        assert_matches_exact(out, exact, mag, fp32_ops=k + rank + 12, what=f"fused call with LoRA, {epilogue}")
    else:
        assert out.dtype == torch.int8
        want = torch.clamp(torch.round(exact / 0.01), -127, 127)
        assert (out.double() - want).abs().max() <= 1 and (out.double() == want).float().mean() > 0.9


def test_branch_follows_the_model_dtype():
    """The adapter's A and B follow model.to(dtype) like the layer's bias; its scale stays float32 (a bfloat16
    scale would be rounded); the bfloat16 output is the float32 one on the same (bfloat16) input (so the same int8
    activations) within four bfloat16 roundings of the magnitude of the terms: the branch's two products and the
    add run in bfloat16, and it can cancel the quantized output (measured: at most 0.2 of that over 200 seeds)."""
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(64, 33)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(33, 64, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(33, generator=g) * 0.1)
    cfg = ditq.QuantConfig.preset("w8a8", backend="torch")
    model = nn.Sequential(QuantLinear.from_linear(lin, cfg, act_scale=torch.tensor([0.02])))
    a, b = torch.randn(2, 64, generator=g), torch.randn(33, 2, generator=g)
    ditq.load_lora(model, {"0.lora_A.weight": a, "0.lora_B.weight": b}, scale=0.3)
    x = torch.randn(5, 64, generator=g).bfloat16().float()
    with torch.no_grad():
        y32 = model(x)
        model.to(torch.bfloat16)
        adapter = model[0].ditq_lora["default"]
        assert (adapter.down.dtype, adapter.up.dtype, adapter.scale.dtype) == \
            (torch.bfloat16, torch.bfloat16, torch.float32) and float(adapter.scale) == pytest.approx(0.3, abs=1e-7)
        y16 = model(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    magnitude = y32.abs() + 0.3 * (x.abs() @ a.abs().T) @ b.abs().T
    assert bool(((y16.float() - y32).abs() <= 4 * 2.0 ** -8 * magnitude).all())


# ---- tiny models ---------------------------------------------------------------------------------------------

def _out_and_kernels(model, inputs, total=False):
    """The output and the ditq ops one forward dispatched, by kernel name (and, with ``total``, all ops)."""
    with torch.no_grad(), CountOps() as c:
        out = model(**inputs)
    kernels = {n.split("::torch_", 1)[1]: k for n, k in c.ops.items() if n.startswith("ditq::")}
    return (out.sample if hasattr(out, "sample") else out[0], kernels) + ((sum(c.ops.values()),) if total else ())


# Ops (aten and ditq, views included) one forward of the fused tiny models dispatches with the LoRA of
# test_fused_projections_and_blocks (DiT: 15 branches on 11 layers, FLUX: 12 on 8), W8A8 static, torch backend:
# upper bounds, as in test_op_counts; README ("LoRA.") quotes them. Without the adapter: 86 and 179.
FUSED_OPS_WITH_LORA = {"dit": 220, "flux": 277}


@pytest.fixture(scope="module")
def flux():
    """(float model, inputs, quantized W8A8 copy), shared: tests copy the quantized model before changing it."""
    model, inputs = tiny_flux()
    return model, inputs, _quantized(model, inputs)


@pytest.fixture(scope="module")
def dit():
    model, inputs = tiny_dit(seed=0), dit_inputs(batch=2, seed=1)
    return model, inputs, _quantized(model, inputs)


@pytest.fixture
def family_model(request):
    """(float model, inputs, a fresh copy of its quantized model, LoRA targets) of the family parametrized."""
    model, inputs, q = request.getfixturevalue(request.param)
    return model, inputs, copy.deepcopy(q), FLUX_TARGETS if request.param == "flux" else DIT_TARGETS


@pytest.mark.parametrize("family_model", ["dit", "flux"], indirect=True)
def test_tiny_model_computes_the_merged_float_model(family_model):
    """Loaded: the output moves away from the unadapted quantized model (to 23.5 dB FLUX, 27.5 dB DiT) and close to
    the float model with the LoRA merged (measured 42.3 dB FLUX, 46.4 dB DiT, W8A8, about what the unadapted
    quantized model scores against its own float model: 42.2 and 47.5 dB); scale 0 is the model without it bit for
    bit; a new scale is the scaled adapter; unloading restores bit for bit."""
    model, inputs, q, targets = family_model
    sd = _adapter(model, targets)
    base = _out(q, inputs)
    ditq.load_lora(q, sd)
    with_lora = _out(q, inputs)
    merged = _out(_merged(model, (sd, 1.0)), inputs)
    assert ditq.sqnr(merged, _out(model, inputs)) < 32  # the adapter matters
    assert ditq.sqnr(merged, with_lora) > 40 > ditq.sqnr(base, with_lora) + 8
    ditq.set_lora_scale(q, 0.0)
    assert torch.equal(_out(q, inputs), base)
    ditq.set_lora_scale(q, -0.5)
    half = _out(_merged(model, (sd, -0.5)), inputs)
    assert ditq.sqnr(half, _out(q, inputs)) > 40
    ditq.unload_lora(q)
    assert torch.equal(_out(q, inputs), base) and not _has_lora_state(q)


def test_two_adapters_add_up(flux):
    """Two adapters on overlapping layers: the output is the float model with both merged; unloading one leaves
    exactly the other (bit for bit the model with only that one loaded)."""
    model, inputs, q = flux
    q = copy.deepcopy(q)
    a = _adapter(model, FLUX_TARGETS[:5], seed=1, std=0.2)
    b = _adapter(model, FLUX_TARGETS[3:], seed=2, std=0.2, prefix="")
    ditq.load_lora(q, a, adapter_name="a", scale=0.8)
    ditq.load_lora(q, b, adapter_name="b", scale=1.5)
    assert lora.loaded_adapters(q) == {"a": pytest.approx(0.8), "b": 1.5}
    both = _out(q, inputs)
    to_both = ditq.sqnr(_out(_merged(model, (a, 0.8), (b, 1.5)), inputs), both)  # measured 42.5 dB
    assert to_both > 40
    # each one merged alone is further away (measured 32.2 dB without a, 5.4 dB without b)
    assert max(ditq.sqnr(_out(_merged(model, (b, 1.5)), inputs), both),
               ditq.sqnr(_out(_merged(model, (a, 0.8)), inputs), both)) < to_both - 6
    ditq.unload_lora(q, "a")
    only_b = _out(q, inputs)
    ditq.unload_lora(q)
    ditq.load_lora(q, b, adapter_name="b", scale=1.5)
    assert torch.equal(_out(q, inputs), only_b)


@pytest.mark.parametrize("family_model", ["dit", "flux"], indirect=True)
def test_fused_projections_and_blocks(family_model):
    """A fused model (q/k/v as one GEMM, fused blocks): a LoRA written for to_q / to_k / to_v goes on to_qkv (A
    stacked, B block-diagonal); the blocks stay fused (the same fused norms and GEMMs run) and give the unfused
    quantized model with the same LoRA to fp32 rounding; scale 0 and unloading give the fused model bit for bit as
    before. Fusing a model that already carries adapters stacks them onto the fused layers the same way."""
    model, inputs, unfused, targets = family_model
    family = "flux" if targets is FLUX_TARGETS else "dit"
    fused = _quantized(model, inputs, fuse=True)
    block = fused.transformer_blocks[0]
    assert type(block).__name__.startswith("Fused") and hasattr(block.attn1 if family == "dit" else block.attn,
                                                                 "to_qkv")
    sd = _adapter(model, targets)
    base, kernels = _out_and_kernels(fused, inputs)
    placed = ditq.load_lora(fused, sd)
    qkv = next(p for p in placed if p.endswith("to_qkv"))
    assert [p.rsplit(".", 1)[1] for p in placed[qkv]] == ["to_q", "to_k", "to_v"]
    out, with_lora, total = _out_and_kernels(fused, inputs, total=True)
    assert with_lora["norm_modulate_quantize"] == kernels["norm_modulate_quantize"], with_lora  # still fused
    assert total <= FUSED_OPS_WITH_LORA[family], total
    reference = copy.deepcopy(unfused)
    ditq.load_lora(reference, sd)
    expected = _out(reference, inputs)
    assert ditq.sqnr(expected, out) > 100
    ditq.set_lora_scale(fused, 0)
    off, off_kernels = _out_and_kernels(fused, inputs)
    assert torch.equal(off, base) and off_kernels == kernels
    ditq.unload_lora(fused)
    assert torch.equal(_out(fused, inputs), base) and not _has_lora_state(fused)

    # adapters first, then fusion: concat stacks them
    from ditq.blocks import fuse_blocks
    from ditq.fuse import fuse_projections

    late = unfused
    ditq.load_lora(late, sd)
    fuse_projections(late)
    fuse_blocks(late)
    assert isinstance(late.transformer_blocks[0].get_submodule("attn1.to_qkv" if family == "dit" else "attn.to_qkv"),
                      QuantLinear)
    assert ditq.sqnr(expected, _out(late, inputs)) > 100


def _every_linear(model, seed=3, std=0.05):
    """A random LoRA on every linear of ``model`` (float paths), quantized or kept in float."""
    names = sorted({n.rsplit(".", 1)[-1] if n.rsplit(".", 1)[-1] not in ("0", "1", "2") else n.rsplit(".", 2)[-2] +
                    "." + n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    return _adapter(model, names, seed=seed, std=std)


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "sd35m", "flux"])
@pytest.mark.parametrize("act_scheme", ["static", "dynamic"])
def test_every_fused_gemm_takes_its_branch(family, act_scheme):
    """A LoRA on every linear of the model: each fused GEMM call site of the fused blocks (norm-fed q/k/v and fc1,
    attention outputs, adaLN linears, fc2 after an fc1 that then writes float, FLUX's proj_mlp / proj_out, the
    text stream, PixArt's cross-attention, SD3.5-medium's second attention) adds its branch: the fused model with
    the LoRA gives the unfused quantized model with the same LoRA to fp32 rounding, while running the same fused
    norm and attention kernels as without it. Static and per-token activation scales."""
    model, inputs = (tiny_dit(seed=0), dit_inputs(batch=2, seed=1)) if family == "dit" else FAMILIES[family]()
    sd = _every_linear(model)
    unfused = _quantized(model, inputs, act_scheme=act_scheme)
    fused = _quantized(model, inputs, act_scheme=act_scheme, fuse=True)
    _, kernels = _out_and_kernels(fused, inputs)
    placed = ditq.load_lora(fused, sd)
    assert sum(map(len, placed.values())) == sum(k.endswith(".lora_A.weight") for k in sd)
    out, with_lora = _out_and_kernels(fused, inputs)
    for name in ("norm_modulate_quantize", "attention_inputs"):
        assert with_lora.get(name) == kernels.get(name), (name, with_lora, kernels)
    ditq.load_lora(unfused, sd)
    expected = _out(unfused, inputs)
    assert ditq.sqnr(expected, out) > 100
    assert ditq.sqnr(expected, _out(_quantized(model, inputs, act_scheme=act_scheme), inputs)) < 40  # it matters


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_fused_bfloat16_model_takes_its_branches(family):
    """A bfloat16 model: the fused blocks with a LoRA on every linear give the unfused quantized model with the
    same LoRA to bfloat16 rounding (measured 42.6 dB DiT, 45.7 dB FLUX; without the LoRA the two are 44.7 / 48.0 dB
    apart: int8 ties moved by bfloat16 roundings), far from the model without the branches (about 19 dB)."""
    model, inputs = (tiny_dit(seed=0), dit_inputs(batch=2, seed=1)) if family == "dit" else FAMILIES[family]()
    sd = {k: v.bfloat16() for k, v in _every_linear(model).items()}
    model = model.bfloat16()
    inputs = {k: v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in inputs.items()}
    unfused, fused = _quantized(model, inputs), _quantized(model, inputs, fuse=True)
    plain = _out(unfused, inputs).float()
    for q in (unfused, fused):
        ditq.load_lora(q, sd)
    expected, got = _out(unfused, inputs).float(), _out(fused, inputs).float()
    assert ditq.sqnr(expected, got) > 38 > 25 > ditq.sqnr(expected, plain)


def test_an_adapted_layer_refuses_a_fused_call_without_its_float_input():
    """forward_fused on a layer with an active adapter needs lora_input: dropping the branch silently would be a
    wrong result."""
    lin = nn.Linear(64, 32)
    layer = QuantLinear.from_linear(lin, ditq.QuantConfig.preset("w8a8", backend="torch"),
                                    act_scale=torch.tensor([0.02]))
    model = nn.Sequential(layer)
    ditq.load_lora(model, {"0.lora_A.weight": torch.randn(2, 64), "0.lora_B.weight": torch.randn(32, 2)})
    x = torch.randn(3, 64)
    q, s = layer._kernels.quantize_act(x, layer.act_scale)
    with pytest.raises(RuntimeError, match="lora_input"):
        layer.forward_fused(q, s, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(layer.forward_fused(q, s, torch.float32, lora_input=x), layer(x), rtol=0, atol=0)
    # bad epilogue arguments: the same refusals as without the adapter
    for bad in (dict(gate=torch.randn(1, 32), rows_per_gate=2), dict(residual=torch.randn(3, 32).double()),
                dict(gelu=1), dict(out_scale=torch.tensor([-1.0]))):
        errors = []
        for scale in (1.0, 0.0):
            ditq.set_lora_scale(model, scale)
            with pytest.raises((ValueError, TypeError)) as e:
                layer.forward_fused(q, s, torch.float32, lora_input=x, **bad)
            errors.append((type(e.value), str(e.value)))
        assert errors[0] == errors[1], errors


@pytest.mark.skipif(not EMULATED, reason="needs ditq._C (cuda-emulated)")
def test_cuda_emulated_fused_flux(flux):
    """The CUDA kernels (under the emulator) with the fused FLUX blocks: the branch adds the same float terms, so
    the adapted model is as close to the merged float model (measured 42.3 dB) and unloading restores the fused
    forward bit for bit."""
    model, inputs, _ = flux
    q = _quantized(model, inputs, fuse=True, backend="cuda-emulated")
    assert {m.backend for m in q.modules() if isinstance(m, QuantLinear)} == {"cuda-emulated"}
    base = _out(q, inputs)
    sd = _adapter(model, FLUX_TARGETS)
    ditq.load_lora(q, sd)
    assert ditq.sqnr(_out(_merged(model, (sd, 1.0)), inputs), _out(q, inputs)) > 40
    ditq.unload_lora(q)
    assert torch.equal(_out(q, inputs), base)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family, backend", [("dit", "cuda"), ("dit", "triton"), ("flux", "cuda"),
                                             ("flux", "triton")])
def test_fused_model_with_lora_on_gpu_kernels_and_in_a_cuda_graph(family, backend):
    """The fused blocks with a LoRA on every linear on the GPU kernels: the output is the torch backend's (the
    reference maths; measured on the CPU, fused vs unfused with the LoRA: > 100 dB, here the kernels' fp32
    roundings and int8 ties: > 60 dB). A CUDA graph captured with the adapter replays the eager forward, and sees a
    new nonzero scale written after the capture (the scale buffer is written in place)."""
    reason = backends.unavailable_reason(backend, "cuda")
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable on cuda: {reason}")
    model, inputs = (tiny_dit(seed=0), dit_inputs(batch=2, seed=1)) if family == "dit" else FAMILIES[family]()
    q = _quantized(model, inputs, fuse=True)
    ditq.load_lora(q, _every_linear(model))
    reference = _out(q, inputs)
    q.cuda()
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.set_backend(backend)
    x = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        eager = _out(q, x).clone()
        assert ditq.sqnr(reference, eager.cpu()) > 60
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _out(q, x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _out(q, x)
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
        ditq.set_lora_scale(q, 0.5)
        half = _out(q, x).clone()
        graph.replay()
        torch.cuda.synchronize()
    assert ditq.sqnr(eager, half) < 50 and torch.equal(captured, half)


def test_save_quantized_refuses_adapters(flux, tmp_path):
    """Adapters are run-time state a checkpoint does not hold: saving with one loaded is refused (never dropped
    silently); after unloading, the model saves as before."""
    model, inputs, q = flux
    q = copy.deepcopy(q)
    ditq.load_lora(q, _adapter(model, ["proj_out"]), adapter_name="style")
    with pytest.raises(ValueError, match="LoRA adapters loaded \\('style'\\).*unload_lora"):
        ditq.save_quantized(q, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    ditq.unload_lora(q)
    ditq.save_quantized(q, tmp_path / "ckpt")


def test_safetensors_file_with_diffusers_metadata(flux, tmp_path):
    """A path to a .safetensors file; diffusers' LoRA metadata (lora_alpha, alpha_pattern) sets alpha / r."""
    import json

    from safetensors.torch import save_file

    model, inputs, q = flux
    q = copy.deepcopy(q)
    sd = _adapter(model, ["proj_out", "to_out.0"], rank=4)
    meta = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"proj_out": 2}}
    save_file(sd, tmp_path / "a.safetensors", metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    ditq.load_lora(q, tmp_path / "a.safetensors")
    got = _out(q, inputs)
    scaled = {k: v * (0.5 if ".proj_out." in k and k.endswith("B.weight") else
                      2.0 if k.endswith("B.weight") else 1.0) for k, v in sd.items()}
    assert ditq.sqnr(_out(_merged(model, (scaled, 1.0)), inputs), got) > 40
    with pytest.raises(ValueError, match="reads .safetensors"):
        (tmp_path / "a.bin").write_bytes(b"x")
        ditq.load_lora(q, tmp_path / "a.bin", adapter_name="other")


def test_community_format_through_the_pipeline_loader(flux):
    """A pipeline whose class has diffusers' lora_state_dict (FLUX here) converts a kohya LoRA (BFL names, fused
    qkv, alpha baked in) to diffusers keys before ditq applies it; no peft involved. The same dict on the bare
    transformer names no module."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    class Pipe(FluxLoraLoaderMixin):  # a FluxPipeline's LoRA side without its text encoders and VAE
        def __init__(self, transformer):
            self.transformer = transformer

    model, inputs, q = flux
    q = copy.deepcopy(q)
    g = torch.Generator().manual_seed(5)
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 64, generator=g) / 8,
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(192, 4, generator=g) * 0.05,
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)}
    with pytest.raises(ValueError, match="not LoRA weights"):
        ditq.load_lora(q, kohya)
    placed = ditq.load_lora(Pipe(q), kohya)
    assert sorted(placed) == [f"transformer_blocks.0.attn.to_{p}" for p in "kqv"]
    # kohya's branch is up @ down * alpha / r on the concatenated q/k/v rows
    delta = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] @ \
        kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] * 0.5
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for i, p in enumerate("qkv"):
            merged.transformer_blocks[0].attn.get_submodule(f"to_{p}").weight += delta[64 * i:64 * (i + 1)]
    assert ditq.sqnr(_out(merged, inputs), _out(q, inputs)) > 40


# ---- bad input -----------------------------------------------------------------------------------------------

def test_bad_input_is_refused_and_leaves_the_model_unchanged(flux):
    model, inputs, q = flux
    q = copy.deepcopy(q)
    good = _adapter(model, ["proj_out", "to_out.0"])
    key_a = "transformer.proj_out.lora_A.weight"
    key_b = "transformer.proj_out.lora_B.weight"
    cases = [
        ({**good, "transformer.nope.lora_A.weight": good[key_a], "transformer.nope.lora_B.weight": good[key_b]},
         ValueError, "1 LoRA modules name no layer of this FluxTransformer2DModel: 'nope'"),
        ({**good, key_a: good[key_a][:, :-1]}, ValueError,
         r"proj_out: lora_A \[4, 63\] / lora_B \[16, 4\] do not fit the layer \(A must be \[r, 64\]"),
        ({**good, key_b: good[key_b][:, :3]}, ValueError, r"proj_out: lora_A \[4, 64\] and lora_B \[16, 3\] have "
                                                          r"different ranks"),
        ({**good, key_b: good[key_b].clone().index_fill_(0, torch.tensor([3]), float("nan"))}, ValueError,
         "lora_B.weight holds NaN or inf"),
        ({k: v for k, v in good.items() if k != key_b}, ValueError, "proj_out: lora_A without lora_B"),
        ({**good, "transformer.proj_out.lora_B.bias": torch.zeros(64)}, ValueError, "not LoRA weights"),
        ({**good, "text_encoder.x.lora_A.weight": torch.zeros(1, 1)}, ValueError, "other components"),
        ({"transformer.norm_out.lora_A.weight": torch.zeros(1, 1), "transformer.norm_out.lora_B.weight":
          torch.zeros(1, 1)}, ValueError, "norm_out is a AdaLayerNormContinuous, not a linear layer"),
        ({}, ValueError, "holds no LoRA weights"),
        ([1, 2], TypeError, "lora must be a state dict or the path"),
    ]
    base = _out(q, inputs)
    for sd, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ditq.load_lora(q, sd)
        assert not _has_lora_state(q)
    with pytest.raises(ValueError, match="finite"):
        ditq.load_lora(q, good, scale=float("inf"))
    with pytest.raises(ValueError, match="cannot name an adapter"):
        ditq.load_lora(q, good, adapter_name="a.b")
    assert not _has_lora_state(q) and torch.equal(_out(q, inputs), base)

    ditq.load_lora(q, good, adapter_name="one")
    with pytest.raises(ValueError, match="'one' is already loaded"):
        ditq.load_lora(q, good, adapter_name="one")
    for call in (lambda: ditq.set_lora_scale(q, 2.0, adapter_name="two"),
                 lambda: ditq.unload_lora(q, adapter_name="two")):
        with pytest.raises(ValueError, match="no adapter named 'two' is loaded \\(loaded: 'one'\\)"):
            call()
    with pytest.raises(ValueError, match="has no ditq-quantized layer.*diffusers"):
        ditq.load_lora(model, good)  # the float model: diffusers' own loader is the tool
    with pytest.raises(TypeError, match="got int"):
        ditq.load_lora(3, good)


# ---- torch.compile ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_adapter_loads_through_the_compiled_wrapper(dit, tmp_path):
    """pipe.transformer = torch.compile(pipe.transformer), then load_lora / unload_lora / save_quantized on the
    wrapper: they act on the module it compiled (whose layer names the adapter uses), and the compiled model
    recompiles to the adapted one (measured 46.4 dB to the merged float model, as eager). About 15 s: slow."""
    model, inputs, _ = dit
    q = _quantized(model, inputs, fuse=True)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    base = _out(compiled, inputs)
    sd = _adapter(model, DIT_TARGETS)
    ditq.load_lora(compiled, sd)
    assert lora.loaded_adapters(compiled) == {"default": 1.0}
    assert ditq.sqnr(_out(_merged(model, (sd, 1.0)), inputs), _out(compiled, inputs)) > 40
    ditq.unload_lora(compiled)
    assert torch.equal(_out(compiled, inputs), base)
    ditq.save_quantized(compiled, str(tmp_path / "c"))  # the model's own names, no "_orig_mod." prefix
    assert torch.equal(_out(ditq.load_quantized(str(tmp_path / "c")), inputs), base)


def test_an_adapter_on_one_of_equal_embedders_unties_them():
    """A fused DiT computes equal timestep embedders once (checkpoints converted from the original DiT hold one
    embedder copied into every block). An adapter on one block's embedder makes it differ: the fused model plans
    again and computes that one on its own (before, the branch was silently dropped: 33.4 dB to the merged float
    model, the adapter's own effect); unloading ties them again, bit for bit the model before."""
    model, inputs = tiny_dit(seed=0), dit_inputs(batch=2, seed=1)
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    sd = {k: v for k, v in _adapter(model, ["linear_1", "linear_2"], std=0.5).items() if "_blocks.1." in k}
    assert len(sd) == 4  # block 1's timestep embedder (float layers: the default skip list keeps them)
    fused, unfused = _quantized(model, inputs, fuse=True), _quantized(model, inputs)
    assert fused._ditq_dit_plan["owners"] == [0, 0]
    base = _out(fused, inputs)
    for q in (fused, unfused):
        ditq.load_lora(q, sd)
    assert fused._ditq_dit_plan["owners"] == [0, 1]
    merged = _out(_merged(model, (sd, 1.0)), inputs)
    assert ditq.sqnr(merged, _out(model, inputs)) < 35  # the adapter matters
    assert ditq.sqnr(_out(unfused, inputs), _out(fused, inputs)) > 100 and ditq.sqnr(merged, _out(fused, inputs)) > 40
    ditq.unload_lora(fused)
    assert fused._ditq_dit_plan["owners"] == [0, 0] and torch.equal(_out(fused, inputs), base)


@pytest.mark.parametrize("fuse", [False, True])
def test_layers_rescaled_by_smoothing_are_refused(dit, fuse, tmp_path):
    """Outlier smoothing divides q / k / v's, to_out's and fc1's input channels (and their producers' rows) by
    factors the quantized model does not keep, so a branch there would be wrong (measured: 26.7 dB to the merged
    float model instead of 46.4 without smoothing). Such layers are refused, fused projections included (the model
    untouched); the others take adapters and compute the merged model. A saved and loaded checkpoint refuses the
    same layers; one that does not record them (written by an older ditq) refuses every layer."""
    import json

    from ditq.io import HEADER_NAME

    model, inputs, _ = dit
    q = _quantized(model, inputs, smooth_alpha=0.5, calibration="all-steps", fuse=fuse)
    # per block: q / k / v, to_out, fc1 (inputs), the adaLN linear (its shift / scale rows), to_v (also its rows)
    assert len(q._ditq_smoothed) == 2 * 6 and q._ditq_smoothed["transformer_blocks.1.attn1.to_v"] == \
        ["transformer_blocks.1.attn-in", "transformer_blocks.1.attn-out"]
    with pytest.raises(ValueError, match=r"outlier smoothing \(smooth_alpha=0.5\).* 12 layers .*smooth_alpha=None"):
        ditq.load_lora(q, _adapter(model, DIT_TARGETS))
    assert not _has_lora_state(q)
    if fuse:  # an adapter written for the fused layer itself
        qkv = q.get_submodule("transformer_blocks.0.attn1.to_qkv")
        with pytest.raises(ValueError, match="1 layers this LoRA targets: 'transformer_blocks.0.attn1.to_qkv'"):
            ditq.load_lora(q, {"transformer_blocks.0.attn1.to_qkv.lora_A.weight": torch.randn(2, qkv.in_features),
                               "transformer_blocks.0.attn1.to_qkv.lora_B.weight": torch.randn(qkv.out_features, 2)})
    others = _adapter(model, ["ff.net.2", "proj_out_1"])
    ditq.load_lora(q, others)
    assert ditq.sqnr(_out(_merged(model, (others, 1.0)), inputs), _out(q, inputs)) > 40
    ditq.unload_lora(q)
    ditq.save_quantized(q, str(tmp_path / "q"))
    loaded = ditq.load_quantized(str(tmp_path / "q"))
    assert loaded._ditq_smoothed == q._ditq_smoothed
    with pytest.raises(ValueError, match="outlier smoothing"):
        ditq.load_lora(loaded, _adapter(model, ["to_v"]))
    ditq.load_lora(loaded, others)
    header_path = tmp_path / "q" / HEADER_NAME
    header = json.loads(header_path.read_text())
    del header["smoothed"]
    header_path.write_text(json.dumps(header))
    old = ditq.load_quantized(str(tmp_path / "q"))
    with pytest.raises(ValueError, match="does not record which layers"):
        ditq.load_lora(old, others)


def test_other_components_are_refused_or_skipped_with_a_warning(flux):
    """A LoRA file that also adapts the text encoders: refused by default (nothing loaded); with
    other_components="skip" its transformer part loads, bit for bit as without those keys, and a warning counts
    what was left out."""
    model, inputs, q = flux
    q = copy.deepcopy(q)
    sd = _adapter(model, ["to_out.0", "proj_mlp"])
    te = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4),
          "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.randn(4, 32)}
    with pytest.raises(ValueError, match="also adapts other components .*other_components='skip'"):
        ditq.load_lora(q, {**sd, **te})
    assert not _has_lora_state(q)
    ditq.load_lora(q, sd)
    expected = _out(q, inputs)
    ditq.unload_lora(q)
    with pytest.warns(lora.OtherComponentsWarning, match="3 keys of this LoRA adapt text_encoder, text_encoder_2"):
        ditq.load_lora(q, {**sd, **te}, other_components="skip")
    assert torch.equal(_out(q, inputs), expected)
    with pytest.raises(ValueError, match="other_components must be 'error' or 'skip'"):
        ditq.load_lora(q, sd, adapter_name="again", other_components="ignore")


@pytest.mark.slow
@pytest.mark.parametrize("fuse", [False, True])
def test_compiled_model_with_lora_has_no_graph_break(dit, fuse):
    """torch.compile(fullgraph=True) traces a quantized DiT whose quantized layers and float proj_out_1 carry a
    branch (the hook included), unfused or with fused blocks (the adapted layers' float norm inputs, the branch
    before the epilogue), equal to eager; a new nonzero scale reuses the graph (the scale is a buffer written in
    place), switching the adapter off compiles once more. About 16 s each on the CPU: slow."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, inputs, q = dit
    q = _quantized(model, inputs, fuse=True) if fuse else copy.deepcopy(q)
    ditq.load_lora(q, _adapter(model, DIT_TARGETS))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(q, fullgraph=True, backend=counter)
    with torch.no_grad():
        for scale, compiles in ((1.0, 1), (0.5, 1), (0.0, 2)):
            ditq.set_lora_scale(q, scale)
            torch.testing.assert_close(compiled(**inputs).sample, _out(q, inputs), rtol=1e-5, atol=1e-5)
            assert counter.frame_count == compiles, scale
