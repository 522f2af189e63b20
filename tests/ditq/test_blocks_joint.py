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


@pytest.mark.parametrize("family", ["flux", "sd3", "sd35"])
def test_without_the_op_the_blocks_run_diffusers_ops_to_the_same_numbers(family):
    """A backend without ``attention_inputs``: FLUX and SD3 blocks run diffusers' norms / rope / concatenation
    inside the fused forward, SD3.5's (q/k norms) the diffusers forward; the outputs equal the op's."""
    model, inputs = _fused(family)
    y, ops = _run(model, inputs)
    assert ops["ditq::torch_attention_inputs"] == 2
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
    assert ops_plain["ditq::torch_norm_modulate_quantize"] == (0 if family == "sd35" else ops[
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
