"""kernels/interpret.py's launch-side rules: where a Triton kernel runs, and whether the interpreter can run it.

Triton launches on the current CUDA device, not the tensors' device; every public launcher runs with its first
tensor's GPU made current (``on_input_device``). No machine here has two GPUs, so the switch itself is checked with
stand-ins for the tensor and for torch.cuda's device context; the `cuda` test runs it for real where there are two."""
import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from ditq import backends
from ditq.kernels import attention_inputs, interpret, norm_quantize, quantize_act, w4a8, w8a8
from ditq.kernels.interpret import on_input_device

LAUNCHERS = [quantize_act.quantize_act, norm_quantize.norm_modulate_quantize, attention_inputs.attention_inputs,
             w8a8.gemm_w8a8, w8a8.gemm_w8a8_fused, w4a8.gemm_w4a8, w4a8.gemm_w4a8_fused]


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda.current_device / torch.cuda.device over a made-up current index (starts at 0); returns the list of
    indices a device context was entered with."""
    state = {"current": 0, "entered": []}

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            state["entered"].append(self.index)
            self.prev, state["current"] = state["current"], self.index

        def __exit__(self, *exc):
            state["current"] = self.prev

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", Device)
    return state


def _on(index):
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))


def test_a_launch_runs_on_its_inputs_gpu_and_restores_the_current_one(fake_gpus):
    seen = []

    @on_input_device
    def launcher(first, x, *, y=1):
        seen.append((torch.cuda.current_device(), x, y))
        return "launched"

    assert launcher(_on(1), 2, y=3) == "launched"
    assert seen == [(1, 2, 3)] and fake_gpus["current"] == 0 and fake_gpus["entered"] == [1]
    launcher(_on(0), 4)  # already current: no switch
    launcher(torch.zeros(2), 5)  # a CPU tensor (the interpreter): no switch
    launcher("not a tensor", 6)  # left for the launcher's own checks to refuse
    assert seen[1:] == [(0, 4, 1), (0, 5, 1), (0, 6, 1)] and fake_gpus["entered"] == [1]


def test_the_switch_is_undone_when_the_launcher_raises(fake_gpus):
    @on_input_device
    def launcher(first):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        launcher(_on(2))
    assert fake_gpus["current"] == 0


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda f: f.__name__)
def test_every_public_launcher_follows_its_inputs(launcher):
    """The launchers the backends bind (ditq/backends/triton_backend.py; cuda binds attention_inputs) carry the
    switch, and keep their own name, docstring and signature."""
    assert launcher.__qualname__ == inspect.unwrap(launcher).__qualname__
    assert launcher.__code__ is on_input_device(lambda first: None).__code__
    assert list(inspect.signature(launcher).parameters)[:1] == list(
        inspect.signature(inspect.unwrap(launcher)).parameters)[:1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_on_the_second_gpu_while_the_first_is_current():
    from ditq.quant import reference as ref
    from ditq.testing import assert_gemm_w8a8, random_int8

    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 160, generator=g)
    a, sa, w, sw = random_int8(33, 160, generator=g), torch.rand(33, generator=g) + 0.01, \
        random_int8(67, 160, generator=g), torch.rand(67, generator=g) * 0.01
    with torch.cuda.device(0):
        q, s = quantize_act.quantize_act(x.to("cuda:1"))
        y = w8a8.gemm_w8a8(*(t.to("cuda:1") for t in (a, sa, w, sw)), None, torch.float32)
        torch.cuda.synchronize(1)
    qr, sr = ref.quantize_per_token(x)
    assert q.device == torch.device("cuda:1") and torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)
    assert_gemm_w8a8(y.cpu(), a, sa, w, sw, None)


@pytest.fixture
def broken_interpreter(monkeypatch):
    """The loop probe replaced by what an interpreter that cannot run it does (``fails``: raise as triton 3.6's
    does under NumPy 2.4; else count wrong); the cached answer is cleared before and after."""
    state = {"fails": True}

    def launch(out, n):
        if state["fails"]:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        out.fill_(n + 1)

    interpret.interpreter_defect.cache_clear()
    monkeypatch.setattr(interpret, "interpreting", lambda: True)
    monkeypatch.setattr(interpret, "_loop_probe", {(1,): launch})
    yield state
    interpret.interpreter_defect.cache_clear()


@pytest.mark.skipif(not interpret.interpreting(), reason="the probe runs only under the interpreter")
def test_this_interpreter_runs_the_kernels_loops():
    interpret.interpreter_defect.cache_clear()
    assert interpret.interpreter_defect() is None
    assert backends.unavailable_reason("triton", torch.device("cpu")) is None


@pytest.mark.parametrize("fails", [True, False], ids=["raises", "miscounts"])
def test_an_interpreter_that_cannot_run_the_loops_is_refused_on_every_path(broken_interpreter, fails):
    """One sentence, the same from the backend check and from a launcher, instead of an error deep in a kernel."""
    broken_interpreter["fails"] = fails
    defect = interpret.interpreter_defect()
    assert defect is not None and "\n" not in defect and "interpreter" in defect
    assert ("only 0-dimensional" in defect and "NumPy" in defect) if fails else "4 times" in defect
    assert backends.unavailable_reason("triton", torch.device("cpu")) == defect
    g = torch.Generator().manual_seed(1)
    a, w = torch.randint(-127, 128, (3, 32), generator=g, dtype=torch.int8), \
        torch.randint(-127, 128, (5, 32), generator=g, dtype=torch.int8)
    with pytest.raises(RuntimeError) as e:
        w8a8.gemm_w8a8(a, torch.rand(1, generator=g), w, torch.rand(5, generator=g), None, torch.float32)
    assert str(e.value) == defect
    with pytest.raises(RuntimeError, match="interpreter"):
        quantize_act.quantize_act(torch.randn(3, 32, generator=g))


@triton.jit
def _cast_to_bf16(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, interpret.cast_rn(tl.load(x_ptr + offs), tl.bfloat16, True))


def test_cast_rn_rounds_to_nearest_even_and_keeps_every_nan():
    """The interpreter's bf16 rounding (bit arithmetic on the fp32 pattern) equals torch's round-to-nearest-even
    on finite values, ties and overflow to inf included, and gives NaN for a NaN of any payload: an unguarded
    carry turned 0x7F800001 into inf and 0x7FFFFFFF into -0."""
    if backends.unavailable_reason("triton", "cpu") is not None:
        pytest.skip(backends.unavailable_reason("triton", "cpu"))
    g = torch.Generator().manual_seed(11)
    finite = torch.cat([torch.randn(40, generator=g) * 100, torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8,
                                                                       -(1.0 + 2.0 ** -8), 3.4e38, -3.4e38])])
    nans = torch.from_numpy(np.array([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FBFFFFF, 0xFFC00000],
                                     dtype=np.uint32).view(np.float32))
    x = torch.cat([finite, nans, torch.full((64 - finite.numel() - nans.numel(),), 0.5)])
    y = torch.full((64,), float("nan"), dtype=torch.bfloat16)  # poisoned
    _cast_to_bf16[(1,)](x, y, N=64)
    n = finite.numel()
    assert torch.equal(y[:n].view(torch.int16), finite.to(torch.bfloat16).view(torch.int16))
    assert bool(torch.isnan(y[n:n + nans.numel()]).all()), y[n:n + nans.numel()].float()
