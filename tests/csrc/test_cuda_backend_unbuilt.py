"""Without ditq._C, `import ditq` still works and the CUDA backends say precisely why they are unavailable."""
import subprocess
import sys

CODE = r"""
import sys
sys.modules["ditq._C"] = None  # as if the extension were not built: importing it raises ImportError
import torch, ditq
from ditq.backends import unavailable_reason, available_backends, BackendUnavailableError
r = unavailable_reason("cuda-emulated")
assert "ditq._C is not built" in r and "pip install --no-build-isolation -e ." in r, r
assert "ditq._C is not built" in unavailable_reason("cuda"), unavailable_reason("cuda")
assert "cuda-emulated" not in available_backends("cpu")
try:
    torch.ops.ditq.quantize_act(torch.randn(2, 8), None, "cuda-emulated")
except BackendUnavailableError as e:
    assert "not built" in str(e), e
else:
    raise AssertionError("no error")
from ditq import emulator
try:
    emulator.get_emulator_options()
except RuntimeError as e:
    assert "not built" in str(e)
else:
    raise AssertionError("no error")
print("OK")
"""


def test_import_and_reasons_without_the_extension():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]
