// The emulated GEMM launchers (csrc/emulated_gemm.cpp: every tile and group size, with their global-buffer
// registration) as a small torch-free library, so tests/csrc/test_emulator_mutants.py can build them from a
// copy of csrc/ with one planted bug and check that the emulator reports it. Called through ctypes.
#include <cstdio>

#include "emulated_gemm.cpp"

extern "C" {

// W8A8 (group 0) or W4A8 (group > 0) with the emulator's default options (mem_check on). Returns 0 when the
// launch completed, 1 when the emulator reported an error (kind and message filled in), 2 for another
// exception. counters / workspace are used when splits > 1 (zeroed / any contents).
int gemm_probe(const int8_t* a, const float* a_scale, int per_token, const void* w, const float* w_scale,
               void* out, int out_dtype, int M, int N, int K, int group, int tile, int splits, int* counters,
               uint32_t* workspace, char* kind, int kind_len, char* msg, int msg_len) {
  ditq::gemm::GemmParams p{};
  p.a = a;
  p.a_scale = a_scale;
  p.a_scale_per_token = per_token;
  p.w = w;
  p.w_scale = w_scale;
  p.bias = nullptr;
  p.out = out;
  p.out_dtype = static_cast<ditq::DType>(out_dtype);  // DType: 0 f32, 1 f16, 2 bf16
  p.M = M;
  p.N = N;
  p.K = K;
  p.splits = splits;
  p.counters = counters;
  p.workspace = workspace;
  try {
    if (group > 0) ditq::gemm_w4a8_emulated({p, group, tile});
    else ditq::gemm_w8a8_emulated({p, 0, tile});
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
