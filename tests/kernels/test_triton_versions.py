"""What the kernels must write out for every Triton they run on, not only the one CI has.

A GPU machine may carry an older Triton than CI (the H200 image: triton 3.6; CI: 3.8). Compiling the shipped
kernels with triton 3.6 found one difference that CI's Triton forgives: ``tl.dot(a, b, acc)`` with an int32
``acc`` fails to compile before 3.8 (``semantic.dot`` asserts ``acc``'s dtype equals ``out_dtype``, whose default
is float32), so every W8A8 Triton kernel would have failed on that machine. The check is on the source, so it
holds whichever Triton runs the suite."""
import ast
import glob
import os

import ditq.kernels

KERNELS_DIR = os.path.dirname(ditq.kernels.__file__)


def _dots(directory=KERNELS_DIR):
    """(file, line, keyword names) of every ``tl.dot(...)`` call in the Python sources of ``directory``."""
    for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dot" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl":
                yield os.path.basename(path), node.lineno, {k.arg for k in node.keywords}


def test_every_dot_names_its_accumulator_dtype():
    dots = list(_dots())
    assert len(dots) >= 4, dots  # the W8A8 and W4A8 kernels' dots (both operand orders) are found
    missing = [f"{f}:{line}" for f, line, kw in dots if "out_dtype" not in kw]
    assert not missing, (f"tl.dot without out_dtype= at {missing}: Triton before 3.8 refuses an int32 accumulator "
                         f"with the default out_dtype (float32)")


def test_the_check_sees_a_dot_without_out_dtype(tmp_path):
    (tmp_path / "k.py").write_text("import triton.language as tl\n\ndef f(a, b, acc):\n    return tl.dot(a, b, acc)\n")
    assert [(f, kw) for f, _, kw in _dots(str(tmp_path))] == [("k.py", set())]
