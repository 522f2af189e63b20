"""The attention-inputs kernel (q/k RMSNorm + rotary embedding + stream concatenation) against the reference.

Two kinds of input:

* "exact": values k / 16 with |k| < 64, whose squares sum exactly in float32 in any order: the kernel's tree sum
  and torch's sum agree, so every output must equal the reference bit for bit, in every dtype;
* "random": normal values: the sums may round differently, so each q / k element must be within one unit in the
  last place of the output dtype, or, where the rotary embedding cancels (out much smaller than its terms, which
  only float32 can resolve), within a few float32 ulps of its terms. v, and q / k without a norm, bit for bit.

Ragged shapes: batch 1 and 2, S1 = 1 or odd, S2 odd or absent, 1-3 heads, D 16 / 32 / 128 (FLUX's) and D not a
power of two (masked lanes), each norm present or not, rope or not, float32 / bfloat16 / float16. Outputs are
poisoned with NaN before the call; inputs are fresh random tensors.
"""
import itertools
import zlib

import pytest
import torch

from ditq import backends
from ditq.kernels import attention_inputs as ai
from ditq.quant import reference as ref

pytestmark = pytest.mark.gpu  # also run on the GPU by benchmarks/gpu_suite.sh
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# which of (first q, first k, second q, second k) has a norm
NORMS = {"none": (False,) * 4, "all": (True,) * 4, "q1k2": (True, False, False, True),
         "k1": (False, True, False, False)}


def _args(batch, heads, d, s1, s2, dtype, norms, rope, exact, seed, w_dtype=None):
    g = torch.Generator().manual_seed(seed)

    def acts(rows):
        if exact:  # k / 16, |k| < 64: squares are multiples of 2**-8 below 16, summed exactly in float32
            x = torch.randint(-63, 64, (rows, 3 * heads * d), generator=g).float() / 16
        else:
            x = torch.randn(rows, 3 * heads * d, generator=g) * 2
        return x.to(dtype).to(DEVICE)

    first = acts(batch * s1)
    second = acts(batch * s2) if s2 else None
    weights = [(torch.rand(d, generator=g) + 0.5).to(w_dtype or dtype).to(DEVICE) if on and (i < 2 or s2) else None
               for i, on in enumerate(NORMS[norms])]
    cos = sin = None
    if rope:  # angles as FLUX's rotary embedding: cos / sin of real positions times frequencies
        angles = torch.rand(s1 + s2, d // 2, generator=g).double() * 40
        cos, sin = (f(angles).repeat_interleave(2, dim=1).float().to(DEVICE) for f in (torch.cos, torch.sin))
    return [first, second, batch, heads, *weights, EPS, cos, sin, False]


def _poisoned(args):
    first, second, batch, heads = args[:4]
    seq = (first.shape[0] + (0 if second is None else second.shape[0])) // batch
    d = first.shape[1] // (3 * heads)
    return tuple(torch.full((batch, heads, seq, d), float("nan"), dtype=first.dtype, device=first.device)
                 for _ in range(3))


def _error_bound(args, got_dtype):
    """Per element of q and k: a few float32 ulps of the rotary terms, (|y_e| + |y_o|) * (|cos| + |sin|) * 2**-20,
    from the reference's normalized q / k (rope removed): where the sums round differently, the norm's factor is
    an ulp or two off (torch.nn.RMSNorm's fused kernel also forms it its own way), and every term with it."""
    plain = ref.attention_inputs(*args[:-3], None, None, args[-1])
    cos, sin = args[-3], args[-2]
    bounds = []
    for y in plain[:2]:
        y = y.double().abs()
        pair = y.view(*y.shape[:-1], -1, 2).flip(-1).reshape(y.shape)
        trig = 1.0 if cos is None else (cos.double().abs() + sin.double().abs())
        bounds.append((y + pair) * trig * 2.0 ** -20)
    return bounds


def _assert_matches(got, want, args, exact, normed):
    q, k, v = got
    assert all(t.dtype == args[0].dtype and t.is_contiguous() for t in got)
    assert torch.equal(v.view(BITS[v.dtype]), want[2].view(BITS[v.dtype])), "v must be copied bit for bit"
    if exact or not normed:
        for name, a, b in (("q", q, want[0]), ("k", k, want[1])):
            bits = BITS[a.dtype]
            bad = (a.view(bits) != b.view(bits)).nonzero()
            assert bad.numel() == 0, f"{name} differs from the reference at {bad[:5].tolist()}"
        return
    for name, a, b, bound in zip("qk", (q, k), want[:2], _error_bound(args, q.dtype)):
        assert not a.isnan().any(), f"{name} holds NaN (an unwritten or masked element)"
        ulps = (a.view(BITS[a.dtype]).long() - b.view(BITS[a.dtype]).long()).abs()
        ok = (ulps <= 1) | ((a.double() - b.double()).abs() <= bound)
        assert ok.all(), (f"{name}: {int((~ok).sum())} elements beyond 1 ulp and the float32 bound, e.g. "
                          f"{a[~ok][:3].tolist()} vs {b[~ok][:3].tolist()}")


# (batch, heads, D, S1, S2, dtype, norms, rope, exact, torch_norm): ~0.1 s per token under the interpreter.
# torch_norm: torch.nn.RMSNorm's rounding (FLUX's attention), else diffusers' RMSNorm's (SD3.5)
CASES = [
    (1, 1, 16, 1, 0, torch.float32, "all", True, True, True),  # FLUX single block, one token
    (2, 3, 32, 3, 5, torch.bfloat16, "all", True, True, True),  # FLUX joint, two streams
    (2, 3, 32, 3, 5, torch.bfloat16, "all", False, True, False),  # SD3.5: diffusers' norms, no rope
    (1, 2, 128, 1, 3, torch.float16, "q1k2", True, False, False),  # FLUX's head size, norms on some inputs only
    (1, 2, 128, 1, 3, torch.bfloat16, "all", True, False, True),
    (2, 2, 24, 1, 1, torch.bfloat16, "all", False, False, False),  # D not a power of two, no rope
    (1, 3, 16, 3, 0, torch.float16, "none", False, False, False),  # a plain copy into SDPA's layout (SD3)
    (2, 1, 128, 1, 3, torch.float32, "all", True, False, False),
    (1, 2, 9, 3, 1, torch.float32, "k1", False, True, False),  # odd D (no rope)
    (1, 2, 16, 1, 1, torch.bfloat16, "none", True, False, False),  # rope without norms: bit for bit
]


def _id(case):
    b, h, d, s1, s2, dtype, norms, rope, exact, torch_norm = case
    return (f"b{b}-h{h}-d{d}-s{s1}+{s2}-{str(dtype).replace('torch.', '')}-{norms}-{'rope' if rope else 'norope'}"
            f"-{'exact' if exact else 'random'}-{'torchnorm' if torch_norm else 'diffusersnorm'}")


def _run(case, seed, w_dtype=None):
    batch, heads, d, s1, s2, dtype, norms, rope, exact, torch_norm = case
    args = _args(batch, heads, d, s1, s2, dtype, norms, rope, exact, seed, w_dtype)
    args[-1] = torch_norm
    out = _poisoned(args)
    got = ai.attention_inputs(*args, out=out)
    assert all(g is o for g, o in zip(got, out))
    want = ref.attention_inputs(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    _assert_matches([t.cpu() for t in got], want, [a.cpu() if isinstance(a, torch.Tensor) else a for a in args],
                    exact, norms != "none")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_reference(case):
    _run(case, seed=zlib.crc32(_id(case).encode()))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's rms_norm, unfused
@pytest.mark.parametrize("torch_norm", [False, True], ids=["diffusersnorm", "torchnorm"])
def test_float32_weights_on_16_bit_activations(torch_norm):
    """A float32 norm weight on bfloat16 activations: diffusers' RMSNorm keeps q / k in float32 through the rope,
    then rounds once to bfloat16; torch.nn.RMSNorm rounds its output to bfloat16 first."""
    _run((1, 2, 16, 1, 2, torch.bfloat16, "all", True, True, torch_norm), seed=5, w_dtype=torch.float32)


def test_a_stream_without_tokens():
    """S1 = 0 (a stream with no token in this call): the other stream fills the sequence, as torch.cat would."""
    _run((2, 2, 16, 0, 3, torch.bfloat16, "all", True, False, True), seed=7)


@pytest.mark.parametrize("norm_class", ["diffusers", "torch"])
def test_the_reference_is_diffusers(norm_class):
    """ref.attention_inputs is the norm modules (diffusers' RMSNorm, or torch.nn.RMSNorm as FLUX's attention has
    it), concatenation and apply_rotary_emb, bit for bit."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    batch, heads, d, s1, s2 = 2, 3, 32, 3, 5
    for dtype in (torch.float32, torch.bfloat16):
        args = _args(batch, heads, d, s1, s2, dtype, "all", True, False, seed=11)
        first, second = args[0].cpu(), args[1].cpu()
        mods = []
        for w in args[4:8]:
            m = (RMSNorm(d, eps=EPS) if norm_class == "diffusers" else torch.nn.RMSNorm(d, eps=EPS)).to(dtype)
            with torch.no_grad():
                m.weight.copy_(w.cpu())
            mods.append(m)
        q1, k1, v1 = first.view(batch, s1, 3, heads, d).unbind(2)
        q2, k2, v2 = second.view(batch, s2, 3, heads, d).unbind(2)
        rope = (args[9].cpu(), args[10].cpu())
        q = apply_rotary_emb(torch.cat([mods[0](q1), mods[2](q2)], 1), rope, sequence_dim=1)
        k = apply_rotary_emb(torch.cat([mods[1](k1), mods[3](k2)], 1), rope, sequence_dim=1)
        v = torch.cat([v1, v2], 1)
        got = ref.attention_inputs(first, second, batch, heads, *[w.cpu() for w in args[4:8]], EPS, *rope,
                                   norm_class == "torch")
        for a, b in zip(got, (q, k, v)):
            assert torch.equal(a, b.transpose(1, 2))
        if dtype == torch.bfloat16:  # the two norms round differently: the flag matters
            other = ref.attention_inputs(first, second, batch, heads, *[w.cpu() for w in args[4:8]], EPS, *rope,
                                         norm_class != "torch")
            assert not torch.equal(other[0], got[0])


# ---- bad input: the same error, in the same words, on every backend ----------------------------------------

BACKENDS = [b for b in ("torch", "triton", "cuda-emulated") if backends.unavailable_reason(b, "cpu") is None]


def _good():
    return _args(1, 2, 16, 2, 1, torch.float32, "all", True, False, seed=3)


def _bad(i, value):
    def make():
        a = _good()
        a[i] = value(a) if callable(value) else value
        return a
    return make


BAD = {
    "first-int": (_bad(0, lambda a: a[0].to(torch.int8)), TypeError, "first must be"),
    "first-3d": (_bad(0, lambda a: a[0].view(2, 1, -1)), ValueError, "first must have 2 dimension"),
    "first-strided": (_bad(0, lambda a: a[0].t().contiguous().t()), ValueError, "first must be contiguous"),
    "first-width": (_bad(0, lambda a: a[0][:, :-3].contiguous()), ValueError, "not a positive multiple of 6"),
    "batch-zero": (_bad(2, 0), ValueError, "batch must be >= 1"),
    "batch-float": (_bad(2, 1.0), TypeError, "batch must be an int"),
    "batch-not-dividing": (_bad(2, 2), ValueError, "not a multiple of batch = 2"),
    "heads-bool": (_bad(3, True), TypeError, "heads must be an int"),
    "second-dtype": (_bad(1, lambda a: a[1].half()), TypeError, "second must be float32"),
    "second-width": (_bad(1, lambda a: torch.randn(1, 48)), ValueError, "like first"),
    "norm-shape": (_bad(4, lambda a: a[4][:-1].contiguous()), ValueError, r"first_q_norm must be float32 \[D\]"),
    "norm-dtype": (_bad(5, lambda a: a[5].half()), TypeError, "first_k_norm must be float32"),
    "second-norm-alone": (lambda: [*_good()[:1], None, *_good()[2:]], ValueError, "without a second stream"),
    "eps-zero": (_bad(8, 0.0), ValueError, "eps must be finite and positive"),
    "eps-str": (_bad(8, "1e-6"), TypeError, "eps must be a real number"),
    "cos-alone": (_bad(10, None), ValueError, "rope_cos and rope_sin come together"),
    "cos-shape": (_bad(9, lambda a: a[9][:-1].contiguous()), ValueError, r"rope_cos must be float32 \[S1 \+ S2, D\]"),
    "sin-dtype": (_bad(10, lambda a: a[10].double()), TypeError, "rope_sin must be float32"),
    "rope-odd-d": (lambda: [torch.randn(2, 18), None, 1, 2, None, None, None, None, EPS, torch.randn(2, 3),
                            torch.randn(2, 3), False], ValueError, "must be even"),
    "torch-norm-int": (_bad(11, 1), TypeError, "torch_norm must be a bool"),
    "meta-cos": (_bad(9, lambda a: a[9].to("meta")), ValueError, "rope_cos is on meta"),
}


# argument types the op schema itself refuses (int batch / heads, float eps) before any backend sees them: they
# reach the Python-level check only when the launcher or the reference is called directly
SCHEMA_REFUSES = {"batch-float", "heads-bool", "eps-str", "torch-norm-int"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_alike_on_every_backend(case):
    from ditq.ops import check_attention_inputs

    make, exc, match = BAD[case]
    messages = {}
    for backend in BACKENDS if case not in SCHEMA_REFUSES else ():
        with pytest.raises(exc, match=match) as e:
            torch.ops.ditq.attention_inputs(*make(), backend)
        messages[backend] = str(e.value)
        with pytest.raises(exc, match=match):
            backends.get_backend(backend, "cpu").kernel_ops().attention_inputs(*make())
    assert len(set(messages.values())) <= 1, messages
    for fn in (ai.attention_inputs, check_attention_inputs):
        with pytest.raises(exc, match=match):
            fn(*make())


# ---- more combinations, slow ---------------------------------------------------------------------------------

# every dtype x norm style at one ragged two-stream shape with rope, random inputs (the suite's time budget)
SWEEP = [(2, 3, 32, 3, 1, dt, "all", True, False, t) for dt, t in itertools.product(
    [torch.float32, torch.bfloat16, torch.float16], [False, True])]


@pytest.mark.slow
@pytest.mark.parametrize("case", SWEEP, ids=[_id(c) for c in SWEEP])
def test_matches_reference_everywhere(case):
    _run(case, seed=zlib.crc32(_id(case).encode()))
