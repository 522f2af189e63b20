"""Sibling projections as one GEMM (ditq.fuse): exact against the unfused quantized model, fewer ops, and
an op-count test per family that fails if a fusion silently falls back."""
import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ditq
from ditq import backends
from ditq.fuse import concat, fuse_projections
from ditq.nn import QuantLinear
from tiny_models import FAMILIES, dit_inputs, tiny_dit, tiny_family

BACKENDS = [b for b in ("torch", "cuda-emulated") if backends.unavailable_reason(b, "cpu") is None]


class CountOps(TorchDispatchMode):
    """Counts every op the dispatcher runs (what a GPU would launch, before any compiler fuses them)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__ if func.namespace == "aten" else func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    def ditq(self) -> int:
        return sum(n for name, n in self.ops.items() if name.startswith("ditq"))


def _count(model, inputs):
    with torch.no_grad(), CountOps() as c:
        model(**inputs)
    return c


# fused layers each family must end up with (per block): a fusion that silently falls back fails here
EXPECTED = {"dit": {"to_qkv": 2}, "pixart": {"to_qkv": 2, "to_kv": 2}, "sd3": {"to_qkv": 2, "to_added_qkv": 2},
            "sd35": {"to_qkv": 2, "to_added_qkv": 2}, "flux": {"to_qkv": 2, "to_added_qkv": 1}}


# sd35: the q/k norms are kept. SD3.5-medium's attn2 (q/k/v fused without a context stream): its processor in float
# below, its quantized fusion in test_blocks_joint (the suite's time budget)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "sd35", "flux"])
def test_fused_projections_equal_the_unfused_quantized_model(family, backend):
    model, inputs = tiny_family(family)
    cfg = ditq.QuantConfig.preset("w4a8", group_size=32, backend=backend, progress=False)
    ditq.quantize(model, cfg, calib_fn=lambda m: m(**inputs))
    unfused = copy.deepcopy(model)
    before = _count(unfused, inputs)

    fused, left = fuse_projections(model)
    kinds = Counter(k.rsplit(".", 1)[-1] for k, m in model.named_modules() if isinstance(m, QuantLinear)
                    and k.rsplit(".", 1)[-1] in ("to_qkv", "to_kv", "to_added_qkv"))
    assert dict(kinds) == EXPECTED[family], (fused, left)
    for attn_name, groups in fused.items():
        attn = model.get_submodule(attn_name)
        for members in groups.values():
            for m in members:
                assert m == "to_q" and "to_kv" in groups or not hasattr(attn, m)  # members are gone

    with torch.no_grad():
        y_ref = unfused(**inputs)
        y = model(**inputs)
    y_ref, y = (o.sample if hasattr(o, "sample") else o[0] for o in (y_ref, y))
    torch.testing.assert_close(y, y_ref, rtol=2e-5, atol=2e-5)

    after = _count(model, inputs)
    saved = sum(2 * (len(ms) - 1) for g in fused.values() for ms in g.values())  # quantize + GEMM per member
    assert after.ditq() == before.ditq() - saved
    print(f"{family}: ditq ops {before.ditq()} -> {after.ditq()}, all ops {sum(before.ops.values())} -> "
          f"{sum(after.ops.values())}")


def test_dual_attention_processor_is_diffusers_joint_processor_in_float():
    """SD3.5-medium's second attention (attn2: diffusers' joint processor called without a context stream, with q/k
    RMSNorms) on fused float projections (no quantization: only the processor differs) gives the model's own
    output; diffusers' fused joint processor could not run it, and its fused self-attention twin is not used."""
    from ditq.fuse import _plan, _switch, joint_qk_norm_processor

    model, inputs = FAMILIES["sd35m"]()
    with torch.no_grad():
        y_ref = model(**inputs)[0]
    for name, attn in list(model.named_modules()):
        if not hasattr(attn, "to_k"):
            continue
        groups, processor = _plan(attn)
        assert type(processor) is joint_qk_norm_processor()  # every attention here has q/k norms

        def linear(fused_name, members, attn=attn):  # the members' float weights side by side
            parts = [getattr(attn, m) for m in members]
            out = torch.nn.Linear(parts[0].in_features, sum(p.out_features for p in parts))
            with torch.no_grad():
                out.weight.copy_(torch.cat([p.weight for p in parts]))
                out.bias.copy_(torch.cat([p.bias for p in parts]))
            return out
        _switch(attn, groups, processor, linear)
        assert not hasattr(attn, "to_q") and (name.endswith("attn2") == (not hasattr(attn, "to_added_qkv")))
    with torch.no_grad():
        y = model(**inputs)[0]
    assert model.transformer_blocks[0].attn2.to_qkv.out_features == 3 * model.transformer_blocks[0].attn2.inner_dim
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)


def test_concat_refuses_members_that_disagree():
    lin = [torch.nn.Linear(64, 32) for _ in range(2)]
    cfg = ditq.QuantConfig.preset("w8a8", backend="torch")
    a = QuantLinear.from_linear(lin[0], cfg, act_scale=0.1)
    b = QuantLinear.from_linear(lin[1], cfg, act_scale=0.2)
    with pytest.raises(ValueError, match="different act_scale"):
        concat([a, b])
    both = concat([a, QuantLinear.from_linear(lin[1], cfg, act_scale=0.1)])
    x = torch.randn(5, 64)
    torch.testing.assert_close(both(x), torch.cat([a(x), QuantLinear.from_linear(lin[1], cfg, act_scale=0.1)(x)],
                                                  dim=-1), rtol=0, atol=0)


@pytest.mark.parametrize("loader", ["load_quantized", "from_pretrained"])
def test_fused_model_saves_and_loads_fused(tmp_path, loader):
    from diffusers import DiTTransformer2DModel

    from ditq.blocks import fuse_blocks, fused_block_class

    model, inputs = tiny_dit(seed=0), dit_inputs(batch=2, seed=1)
    ditq.quantize(model, ditq.QuantConfig.preset("w4a8", group_size=32, backend="torch", progress=False),
                  calib_fn=lambda m: m(**inputs))
    fuse_projections(model)
    fuse_blocks(model)
    ditq.save_quantized(model, str(tmp_path))
    if loader == "load_quantized":
        loaded = ditq.load_quantized(str(tmp_path))
    else:
        pytest.importorskip("accelerate")
        loaded = DiTTransformer2DModel.from_pretrained(str(tmp_path))
    block = loaded.transformer_blocks[0]
    assert isinstance(block.attn1.to_qkv, QuantLinear) and not hasattr(block.attn1, "to_q")
    assert type(block) is fused_block_class()
    assert loaded._ditq_dit_plan == model._ditq_dit_plan  # the once-per-forward conditioning is back too
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, model(**inputs).sample, rtol=0, atol=0)


def test_fused_flux_saves_and_loads_fused(tmp_path):
    from ditq.blocks import fuse_blocks

    model, inputs = FAMILIES["flux"]()
    ditq.quantize(model, ditq.QuantConfig.preset("w8a8", backend="torch", fuse=True, progress=False),
                  calib_fn=lambda m: m(**inputs))
    ditq.save_quantized(model, str(tmp_path))
    loaded = ditq.load_quantized(str(tmp_path))
    assert [type(b).__name__ for b in (loaded.transformer_blocks[0], loaded.single_transformer_blocks[0])] == \
        ["FusedFluxTransformerBlock", "FusedFluxSingleTransformerBlock"]
    assert fuse_blocks(loaded) == {}  # nothing left to fuse: loading restored all of it
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[0], model(**inputs)[0], rtol=0, atol=0)


def test_quantize_with_fuse_reports_and_matches_the_unfused_model():
    base, inputs = tiny_dit(seed=0), dit_inputs(batch=2, seed=1)
    outs, reports = {}, {}
    for fuse in (False, True):
        model = copy.deepcopy(base)
        cfg = ditq.QuantConfig.preset("w8a8", backend="torch", fuse=fuse, progress=False)
        reports[fuse] = ditq.quantize(model, cfg, calib_fn=lambda m: m(**inputs))
        with torch.no_grad():
            outs[fuse] = model(**inputs).sample
    assert reports[False].fusion == {}
    fusion = reports[True].fusion
    assert len(fusion["projections"]) == 2 and all(why is None for why in fusion["blocks"].values())
    assert "fusion: q/k/v as one GEMM in 2 attention(s); 2 of 2 block(s)" in str(reports[True])
    assert ditq.sqnr(outs[False], outs[True]) > 60
    with pytest.raises(ditq.config.QuantConfigError, match="fuse must be True or False"):
        ditq.QuantConfig(fuse="yes")
