"""QuantLinear's forward is thin: the backend is bound once per layer and device, never resolved per call.

Counted with ``sys.setprofile`` ("call" events: Python frames, the nn.Module call machinery and the reference
backend's own maths included), a forward makes at most 15 Python calls; moving a layer (or switching its backend) re-prepares the
weight in the new backend's layout."""
import subprocess
import sys

import pytest
import torch

import ditq
from ditq import backends
from ditq.nn import QuantLinear

EMULATED = backends.unavailable_reason("cuda-emulated", "cpu") is None
MAX_PYTHON_CALLS = 15


def _layer(bits: int, backend: str, act_scheme: str = "static", k: int = 256, n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=g))
    cfg = ditq.QuantConfig.preset("w8a8" if bits == 8 else "w4a8", act_scheme=act_scheme, backend=backend)
    return QuantLinear.from_linear(lin, cfg, act_scale=torch.tensor([0.03]) if act_scheme == "static" else None)


def _python_calls(fn) -> list:
    fn()  # warm: first calls may register ops, fill caches
    calls = []
    skip = {fn.__code__, _python_calls.__code__}

    def profile(frame, event, arg):
        if event == "call" and frame.f_code not in skip:
            calls.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


BACKENDS = ["torch"] + (["cuda-emulated"] if EMULATED else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act_scheme", ["static", "dynamic"])
def test_forward_python_calls(backend, bits, act_scheme):
    layer = _layer(bits, backend, act_scheme)
    x = torch.randn(3, 5, 256)
    calls = _python_calls(lambda: layer(x))
    assert len(calls) <= (MAX_PYTHON_CALLS if backend == "torch" else 6), calls
    # nothing on the hot path asks which backend to use, or whether it is available
    assert not [c for c in calls if c.split(":")[1] in ("resolve", "resolve_for", "get_backend",
                                                        "unavailable_reason", "is_available")], calls


def test_backend_is_not_resolved_per_call(monkeypatch):
    layer = _layer(4, "torch")
    x = torch.randn(7, 256)
    y = layer(x)

    def boom(*a, **k):
        raise AssertionError("backend resolved during forward")

    monkeypatch.setattr(backends, "resolve", boom)
    monkeypatch.setattr(backends, "resolve_for", boom)
    monkeypatch.setattr(backends, "get_backend", boom)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


@pytest.mark.skipif(not EMULATED, reason="needs ditq._C (cuda-emulated)")
@pytest.mark.parametrize("bits", [8, 4])
def test_set_backend_reprepares_the_weight(bits):
    layer = _layer(bits, "torch")
    x = torch.randn(9, 256)
    y_ref = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    canonical_qweight = layer.qweight.clone()

    layer.set_backend("cuda-emulated")
    assert layer.backend == "cuda-emulated" and layer.backend_request == "cuda-emulated"
    if bits == 4:  # the CUDA kernels read a split-nibble layout: the buffer really changed
        assert not torch.equal(layer.qweight, canonical_qweight)
    for k, v in layer.state_dict().items():  # checkpoints stay canonical whatever runs
        assert torch.equal(v, state[k]), k
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-5)

    layer.set_backend("torch")
    assert torch.equal(layer.qweight, canonical_qweight)
    torch.testing.assert_close(layer(x), y_ref, rtol=0, atol=0)


@pytest.mark.skipif(not EMULATED, reason="needs ditq._C (cuda-emulated)")
def test_a_move_re_resolves_auto(monkeypatch):
    """Two backends on one CPU stand in for a CPU -> GPU move: quantized where "auto" means torch, then moved
    where it means cuda-emulated, the layer converts its weight and runs the new backend's kernels."""
    model = torch.nn.Sequential(_layer(4, "auto"), torch.nn.GELU(), _layer(8, "auto", k=96, n=32, seed=1))
    x = torch.randn(5, 256)
    assert [m.backend for m in (model[0], model[2])] == ["torch", "torch"]
    y_ref = model(x)

    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("cuda-emulated", "torch"))
    model.cpu()
    assert [m.backend for m in (model[0], model[2])] == ["cuda-emulated", "cuda-emulated"]
    assert model[0]._kernels == backends.get_backend("cuda-emulated").kernel_ops()
    torch.testing.assert_close(model(x), y_ref, rtol=1e-5, atol=1e-5)

    model.to(torch.bfloat16)  # a dtype cast keeps the scales float32 and the weight prepared
    assert model[0].scales.dtype == torch.float32 and model[0].bias.dtype == torch.bfloat16
    torch.testing.assert_close(model(x.bfloat16()).float(), y_ref, rtol=3e-2, atol=3e-2)


def test_explicit_backend_stays_and_meta_says_why():
    layer = _layer(8, "torch")
    layer.to("meta")
    assert layer.backend is None
    with pytest.raises(RuntimeError, match="meta device"):
        layer(torch.randn(2, 256))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_quantized_model_moves_to_the_gpu_kernels():
    layer = _layer(4, "auto")
    x = torch.randn(33, 256)
    y_ref = layer(x)
    layer.cuda()
    assert layer.backend in ("cuda", "triton")
    torch.testing.assert_close(layer(x.cuda()).cpu(), y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family, backend", [("dit", "cuda"), ("dit", "triton"), ("flux", "cuda"), ("sd35", "triton")])
def test_fused_quantized_model_replays_in_a_cuda_graph(family, backend):
    """A quantized, fused transformer forward is capturable as it stands: no host sync, no allocation the graph
    does not own, nothing resolved per call (FLUX / SD3.5 add the attention_inputs kernel and q/k norms). One
    eager warm-up (Triton compiles on its first call), then the replay equals the eager forward bit for bit
    (split-K is deterministic)."""
    reason = backends.unavailable_reason(backend, "cuda")
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable on cuda: {reason}")
    from tiny_models import tiny_family

    model, inputs = tiny_family(family)
    ditq.quantize(model, ditq.QuantConfig.preset("w8a8", fuse=True, backend="torch", progress=False),
                  calib_fn=lambda m: m(**inputs))
    model.cuda()
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.set_backend(backend)
    assert layers and all(m.backend == backend for m in layers)
    x = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        eager = model(**x).sample.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(**x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(**x).sample
        captured.fill_(float("nan"))  # the replay must write every element
        graph.replay()
        torch.cuda.synchronize()
    assert torch.isfinite(eager).all() and torch.equal(captured, eager)


@pytest.mark.parametrize("code", [
    # the Triton kernels pull in neither the runtime nor diffusers
    "import sys, ditq.kernels; bad = [m for m in ('diffusers', 'ditq.convert', 'ditq.io', 'ditq.nn', "
    "'ditq.calibrate') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)",
    # ditq registers its checkpoint loader with diffusers when both are imported, in either order
    "import sys, ditq, diffusers; from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m; "
    "sys.exit(0 if 'ditq' in m else 1)",
    "import sys, diffusers, ditq; from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m; "
    "sys.exit(0 if 'ditq' in m else 1)",
], ids=["kernels-alone", "ditq-then-diffusers", "diffusers-then-ditq"])
def test_imports_in_a_fresh_interpreter(code):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_quantized_dit_has_no_graph_break(backend):
    """torch.compile(fullgraph=True) traces a quantized DiT through the kernel ops' fake implementations."""
    from tiny_models import dit_inputs, tiny_dit

    model = tiny_dit(seed=0)
    inputs = dit_inputs(batch=2, seed=1)
    cfg = ditq.QuantConfig.preset("w8a8", backend=backend, progress=False)
    ditq.quantize(model, cfg, calib_fn=lambda m: m(**inputs))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(**inputs).sample
        traced = compiled(**inputs).sample
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)
