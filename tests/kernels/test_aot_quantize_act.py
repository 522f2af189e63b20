"""The compiled activation quantizer uses the exact IEEE operations its interpreter twin emulates."""
import pytest

from ditq.kernels import aot, quantize_act as qa


@pytest.fixture(scope="module")
def compiled():
    jobs = [qa.aot_job({"BLOCK_K": 2048}, 90),
            qa.aot_job({"BLOCK_K": qa.MAX_BLOCK_K}, 80, in_dtype="fp32"),
            qa.aot_job({"BLOCK_K": 2048}, 80, per_token=False, in_dtype="fp16")]
    return list(zip(jobs, aot.compile_many(jobs)))


def test_exact_rounding_ops(compiled):
    for job, c in compiled:
        assert "cvt.rni.f32.f32" in c.ptx  # libdevice.rint: round half to even
        assert "div.rn.f32" in c.ptx  # 1 / s (and absmax / 127) correctly rounded
        assert "div.full" not in c.ptx and "div.approx" not in c.ptx


def test_no_spills_and_wide_loads(compiled):
    for job, c in compiled:
        s = aot.sass_stats(c)
        assert s.spills == 0 and s.stack == 0, s.summary()
        assert s.byte_loads == 0, s.summary()
