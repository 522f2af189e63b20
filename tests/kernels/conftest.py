"""Kernel tests: masked-off lanes of a ``tl.load`` without ``other=`` read poison under the interpreter.

On a GPU those lanes are undefined (whatever the registers held); Triton's interpreter fills them with 0,
which hides a kernel that silently relies on them (a K tail summed from garbage, an absmax over garbage).
The autouse fixture :func:`poison_masked_loads` wraps the interpreter's ``create_masked_load`` for the
duration of each kernel test (nothing in Triton's installed files changes) so that such lanes read:

* NaN for floating-point loads;
* every byte 0x80 for integer loads: -128 as int8, 0x80808080 as int32 (the W4A8 kernel reads packed
  bytes as 32-bit words, so each byte of a poisoned word must be extreme, not only the top one), 128 as
  uint8.

A kernel that relies on those lanes then fails its exactness tests. Loads that do pass ``other=`` (and
tensor-descriptor loads, whose zero fill the TMA engine really does) are untouched.
tests/kernels/test_poison.py proves the fixture works: a kernel with ``other=`` removed fails under it and
passes without it. On a GPU the fixture does nothing: the kernels are compiled, not interpreted.
"""
import numpy as np
import pytest

from ditq.kernels import interpret


class PoisonSwitch:
    """What the fixture yields: ``enabled`` turns the poison off for a test that wants to compare."""

    def __init__(self, active: bool):
        self.active = active  # False when kernels are not interpreted (GPU runs): nothing is wrapped
        self.enabled = active


def poison_like(ptrs):
    """The poison ``other`` tensor for a load through ``ptrs`` (an interpreter TensorHandle of pointers),
    or None for element types without one (booleans, pointers: left to the interpreter's zeros)."""
    from triton.runtime import interpreter as ti

    dtype_tt = ptrs.get_element_ty()
    dtype_np = np.dtype(ti._get_np_dtype(dtype_tt))
    if dtype_np.kind == "f":
        data = np.full(ptrs.data.shape, np.nan, dtype=dtype_np)
    elif dtype_tt.is_bf16():  # the interpreter holds bfloat16 as 16-bit integers: a quiet-NaN bit pattern
        data = np.full(ptrs.data.shape, 0x7FC0, dtype=dtype_np)
    elif dtype_np.kind in "iu" and not dtype_tt.is_ptr():
        data = np.full(ptrs.data.shape, 0x80, dtype=np.uint8).repeat(dtype_np.itemsize).view(dtype_np)
        data = data.reshape(ptrs.data.shape)
    else:
        return None
    return ti.TensorHandle(data, dtype_tt)


@pytest.fixture(autouse=True)
def poison_masked_loads(monkeypatch):
    if not interpret.interpreting():
        yield PoisonSwitch(False)
        return
    from triton.runtime import interpreter as ti

    switch = PoisonSwitch(True)
    original = ti.InterpreterBuilder.create_masked_load

    def create_masked_load(self, ptrs, mask, other, *args, **kwargs):
        if other is None and switch.enabled:
            other = poison_like(ptrs)
        return original(self, ptrs, mask, other, *args, **kwargs)

    monkeypatch.setattr(ti.InterpreterBuilder, "create_masked_load", create_masked_load)
    yield switch
