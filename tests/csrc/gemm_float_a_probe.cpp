// The emulated float-A fused GEMM launchers (csrc/emulated_gemm_fused_float_a.cpp: W8 and every W4 group size,
// fp32 / fp16 / bf16 A, with their global-buffer registration) as a small torch-free library, so
// tests/csrc/test_gemm_float_a_mutants.py can build them from a copy of csrc/ with one planted bug and check that
// the emulator or the exactness test catches it. Called through ctypes.
#include <cstdio>

#include "emulated_gemm_fused_float_a.cpp"

extern "C" {

// A float a of a_dtype (DType: 0 f32, 1 f16, 2 bf16), static a_scale [1], W8A8 (group 0) or W4A8 (group > 0),
// no epilogue piece, fp32 output, splits = 1, the emulator's default options (mem_check on). Returns 0 when the
// launch completed, 1 when the emulator reported an error (kind and message filled in), 2 for another exception.
int gemm_float_a_probe(const void* a, int a_dtype, const float* a_scale, const void* w, const float* w_scale,
                       float* out, int M, int N, int K, int group, int tile, char* kind, int kind_len, char* msg,
                       int msg_len) {
  ditq::gemm::GemmParams p{};
  p.a = a;
  p.a_scale = a_scale;
  p.w = w;
  p.w_scale = w_scale;
  p.out = out;
  p.out_dtype = ditq::DType::kF32;
  p.M = M;
  p.N = N;
  p.K = K;
  p.splits = 1;
  p.fused.rows_per_gate = 1;
  try {
    ditq::gemm_fused_float_a_emulated({p, group, tile, true, static_cast<ditq::DType>(a_dtype)});
  } catch (const ditq::emu::Error& e) {
    std::snprintf(kind, static_cast<size_t>(kind_len), "%s", e.kind().c_str());
    std::snprintf(msg, static_cast<size_t>(msg_len), "%s", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::snprintf(msg, static_cast<size_t>(msg_len), "%s", e.what());
    return 2;
  }
  return 0;
}

}  // extern "C"
