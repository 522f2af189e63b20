"""The fused FLUX / SD3 blocks' attention inputs (ditq.blocks_joint): one ``attention_inputs`` op from the q/k/v
GEMMs to the attention where the backend has it, diffusers' own norms, concatenations and rotary embedding where
it does not, the same numbers either way; q/k norms it does not compute are refused with a reason."""
import copy

import pytest
import torch

import ditq
from ditq import blocks_joint
from ditq.blocks import fuse_blocks
from ditq.fuse import fuse_projections
from test_fuse import CountOps
from tiny_models import FAMILIES


def _quantized(family):
    model, inputs = FAMILIES[family]()
    ditq.quantize(model, ditq.QuantConfig.preset("w8a8", backend="torch", progress=False),
                  calib_fn=lambda m: m(**inputs))
    fuse_projections(model)
    return model, inputs


def _fused(family):
    model, inputs = _quantized(family)
    report = fuse_blocks(model)
    assert all(why is None for why in report.values()), report
    return model, inputs


def _run(model, inputs):
    with torch.no_grad(), CountOps() as c:
        out = model(**inputs)
    return (out.sample if hasattr(out, "sample") else out[0]), c.ops


@pytest.mark.parametrize("family", ["flux", "sd3", "sd35", "sd35m"])
def test_without_the_op_the_blocks_run_diffusers_ops_to_the_same_numbers(family):
    """A backend without ``attention_inputs``: FLUX and SD3 blocks run diffusers' norms / rope / concatenation
    inside the fused forward, SD3.5's (q/k norms) the diffusers forward; the outputs equal the op's. For SD3.5's
    that is the fused model equal to the unfused quantized one bit for bit (SD3.5-medium's dual attention too)."""
    model, inputs = _fused(family)
    y, ops = _run(model, inputs)
    assert ops["ditq::torch_attention_inputs"] == (3 if family == "sd35m" else 2)  # + attn2's (one stream)
    # FLUX's attention normalizes with torch.nn.RMSNorm, SD3.5's with diffusers' RMSNorm (they round differently in
    # 16 bits); SD3 has no q/k norm
    eps = getattr(model.transformer_blocks[0].attn.norm_q, "eps", 1e-6)
    assert model.transformer_blocks[0]._ditq_qk == (eps, family == "flux")
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, ditq.nn.QuantLinear):
            m._kernels = m._kernels._replace(attention_inputs=None)
    y_plain, ops_plain = _run(plain, inputs)
    assert "ditq::torch_attention_inputs" not in ops_plain
    # SD3.5 without the op: the diffusers forward (no fused norm); the others stay fused
    assert ops_plain["ditq::torch_norm_modulate_quantize"] == (0 if family.startswith("sd35") else ops[
        "ditq::torch_norm_modulate_quantize"])
    assert sum(ops_plain.values()) > sum(ops.values())
    # the same norms, rope and concatenation, op for op; only SDPA reads another memory layout
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)


def test_flux_blocks_pass_both_streams_torch_rmsnorm_and_rope():
    """The fused FLUX blocks hand the op the text stream first, the image stream second (the single block: its one
    concatenated stream), the rotary embedding's (cos, sin) and torch_norm."""
    model, inputs = _fused("flux")
    seen = []
    for block in (model.transformer_blocks[0], model.single_transformer_blocks[0]):
        kernels = block.attn.to_qkv._kernels
        op = kernels.attention_inputs

        def spy(*args, _op=op):
            seen.append(args)
            return _op(*args)
        block.attn.to_qkv._kernels = kernels._replace(attention_inputs=spy)
    _run(model, inputs)
    assert len(seen) == 2
    joint, single = seen
    text, tokens = inputs["encoder_hidden_states"].shape[1], inputs["hidden_states"].shape[1]
    assert joint[0].shape[0] == text and joint[1].shape[0] == tokens  # text first, as diffusers' FLUX
    assert single[1] is None and single[0].shape[0] == text + tokens
    for args in seen:
        assert args[-1] is True and args[9].shape == (text + tokens, args[0].shape[1] // 3 // 4)


def test_q_k_norms_it_does_not_compute_are_refused():
    """SD3 blocks with q/k norms other than per-head RMSNorms with a weight (LayerNorm, across-heads RMSNorm,
    differing eps) are left to diffusers, with the reason; FLUX blocks then keep diffusers' norms."""
    from diffusers.models.normalization import RMSNorm

    model, _ = _quantized("sd35")
    attn = model.transformer_blocks[0].attn
    block = model.transformer_blocks[0]
    assert blocks_joint.why_not(block) is None
    d = attn.norm_q.weight.shape[0]
    for norm, words in ((torch.nn.LayerNorm(d), "not an RMSNorm"),
                        (RMSNorm(d * attn.heads, eps=1e-6), "one weight per head dimension"),
                        (RMSNorm(d, eps=1e-6, elementwise_affine=False), "one weight per head dimension"),
                        (RMSNorm(d, eps=1e-5), "differ in kind or eps"),
                        (torch.nn.RMSNorm(d, eps=1e-6), "differ in kind or eps")):
        saved, attn.norm_added_k = attn.norm_added_k, norm
        assert words in blocks_joint.why_not(block)
        attn.norm_added_k = saved

    flux, flux_inputs = _quantized("flux")
    joint = flux.transformer_blocks[0]
    joint.attn.norm_added_k = RMSNorm(joint.attn.norm_added_k.weight.shape[0], eps=1e-6)  # a mixed kind
    assert all(why is None for why in fuse_blocks(flux).values())  # FLUX's fused forward keeps diffusers' norms
    assert joint._ditq_qk is None
    _, ops = _run(flux, flux_inputs)
    assert ops["ditq::torch_attention_inputs"] == 1  # the single block only


def _dual(**overrides):
    """The tiny SD3.5-medium-like model, or (``overrides``) SD3 with other dual-attention layers or q/k norms."""
    from tiny_models import tiny_sd3

    return tiny_sd3(**{"qk_norm": "rms_norm", "dual_attention_layers": (0,), **overrides})


def test_dual_attention_without_qk_norms_and_in_the_last_block_runs_fused():
    """Dual attention in every block (the last one's context stream only feeds k/v) and without q/k norms: fused,
    bit for bit the unfused quantized model; without ``attention_inputs`` attn2 takes a view and one permute to
    SDPA's layout inside the fused forward (no norm to apply), to the same numbers."""
    model, inputs = _dual(qk_norm=None, dual_attention_layers=(0, 1))
    ditq.quantize(model, ditq.QuantConfig.preset("w8a8", backend="torch", progress=False),
                  calib_fn=lambda m: m(**inputs))
    fuse_projections(model)
    unfused = copy.deepcopy(model)
    assert all(why is None for why in fuse_blocks(model).values())
    assert [b._ditq_qk2 for b in model.transformer_blocks] == [(1e-6, False)] * 2
    (y, ops), (y_ref, _) = _run(model, inputs), _run(unfused, inputs)
    assert ops["ditq::torch_attention_inputs"] == 4 and ops["ditq::torch_norm_modulate_quantize"] == 9
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for m in model.modules():
        if isinstance(m, ditq.nn.QuantLinear):
            m._kernels = m._kernels._replace(attention_inputs=None)
    y_plain, ops_plain = _run(model, inputs)
    assert "ditq::torch_attention_inputs" not in ops_plain and ops_plain["ditq::torch_norm_modulate_quantize"] == 9
    torch.testing.assert_close(y_plain, y_ref, rtol=0, atol=0)
    with torch.no_grad():  # attn2 matters: without its output projection the model's output changes
        for b in model.transformer_blocks:
            b.attn2.to_out[0].bias.zero_()
    assert (_run(model, inputs)[0] - y_ref).abs().max() > 1e-3


def test_dual_attention_refusals_and_checkpoint_round_trip(tmp_path):
    """The SD3.5-medium-like model quantized with ``fuse=True``: every block fused, attn2's q/k/v in one GEMM; the
    checkpoint loads fused, bit for bit. A dual block whose attn2 is not fused or has q/k norms the op does not
    take is refused with the reason."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.normalization import RMSNorm

    model, inputs = _dual()
    report = ditq.quantize(model, ditq.QuantConfig.preset("w8a8", backend="torch", fuse=True, progress=False),
                           calib_fn=lambda m: m(**inputs))
    assert all(why is None for why in report.fusion["blocks"].values()), report.fusion
    assert report.fusion["projections"]["transformer_blocks.0.attn2"] == {"to_qkv": ["to_q", "to_k", "to_v"]}
    ditq.save_quantized(model, str(tmp_path))
    loaded = ditq.load_quantized(str(tmp_path))
    block = loaded.transformer_blocks[0]
    assert type(block).__name__ == "FusedJointTransformerBlock" and not hasattr(block.attn2, "to_q")
    assert fuse_blocks(loaded) == {}  # nothing left to fuse: loading restored all of it
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[0], model(**inputs)[0], rtol=0, atol=0)

    block = model.transformer_blocks[0]
    attn2 = block.attn2
    assert blocks_joint._sd3_why_not(block) is None
    saved, attn2.norm_k = attn2.norm_k, RMSNorm(attn2.norm_k.weight.shape[0], eps=1e-5)
    assert "its dual attention's q/k RMSNorms differ in kind or eps" in blocks_joint._sd3_why_not(block)
    attn2.norm_k = saved
    attn2.set_processor(JointAttnProcessor2_0())  # diffusers' own: it would call the fused-away to_q
    assert "its dual attention's (attn2) q/k/v are not fused" in blocks_joint._sd3_why_not(block)
