"""The SASS parser and loop finder of ditq.kernels.aot on hand-written cuobjdump text (no compile), and
the error a failed compile raises."""
import pytest

from ditq.kernels import aot, w8a8

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;       /* 0x0 */
        /*0020*/                   LDGSTS.E.BYPASS.128 [R9], desc[UR4][R2.64] ;
        /*0030*/                   IMMA.16832.S8.S8 R8, R12, R16, R8 ;
        /*0040*/              @!P0 BRA 0x30 ;
        /*0050*/                   LDG.E.U8 R5, desc[UR4][R2.64] ;
        /*0060*/                   STL [R1], R5 ;
        /*0070*/                   IMMA.16832.S8.S8 R8, R12, R16, R8 ;
        /*0080*/                   LDL R5, [R1] ;
        /*0090*/              @P1 BRA 0x0 ;
        /*00a0*/                   EXIT ;
"""


def test_parse_sass_and_main_loop():
    instrs = aot.parse_sass(SASS)
    assert [op for _, op, _ in instrs][:3] == ["LDC", "LDG.E.128", "LDGSTS.E.BYPASS.128"]
    assert len(instrs) == 11
    loop = aot.main_loop(instrs)  # the smallest backward-branch range holding an MMA: 0x30..0x40
    assert [addr for addr, _, _ in loop] == [0x30, 0x40]


def test_compile_failure_is_reported():
    job = w8a8.aot_job(dict(BM=16, BN=16, BK=32, GROUP_M=8, SWAP_AB=False, USE_TMA=False, num_warps=4,
                                num_stages=2), 90)
    job["signature"] = dict(job["signature"], K="not-a-type")
    with pytest.raises(aot.AOTError, match="AOT compile failed"):
        aot.compile_many([job])
