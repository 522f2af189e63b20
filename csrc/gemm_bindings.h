// Torch bindings of the int8 GEMMs, as ditq_C ops. Included by bindings.cpp only: the one translation unit
// that pays for torch's headers. Every argument is checked here with a message a user understands before any
// launch (ditq/ops.py validates the op contract first; these checks guard what the kernels assume beyond it:
// device, alignment, K granularity, the W4 layout's shape) and the output is allocated here.
#pragma once

#include <torch/extension.h>

#include "binding_messages.h"
#include "configs/gemm_tiles.h"
#include "configs/gemm_tiles_sm90.h"
#include "configs/kernel_families.h"
#include "gemm.h"

#if DITQ_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace ditq::gemm_binding {

using ditq::gemm::GemmParams;

// M as the tile tables' rules read it (an int; every bucket bound is far below 2^30), from a tensor's row count
// or an op's int argument: clamped to [0, 2^30] so that no int64 M wraps into another bucket.
inline int clamp_m(int64_t m) { return static_cast<int>(std::min<int64_t>(std::max<int64_t>(m, 0), 1 << 30)); }

inline ditq::DType out_dtype_of(at::ScalarType t) {
  if (t == at::kFloat) return ditq::DType::kF32;
  if (t == at::kHalf) return ditq::DType::kF16;
  if (t == at::kBFloat16) return ditq::DType::kBF16;
  TORCH_CHECK_TYPE(false, "out_dtype must be float32, float16 or bfloat16, got ", t);
}

inline std::string group_sizes_text() {  // "32, 64, ..." from DITQ_W4_GROUP_SIZES
  std::string out;
  for (int g : ditq::gemm::kW4GroupSizes) out += (out.empty() ? "" : ", ") + std::to_string(g);
  return out;
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Checks shared by both GEMMs; returns the problem with everything but w / w_scale filled in. `float_a`: the
// fused GEMMs, which also take an fp32 / fp16 / bf16 `a` with a static a_scale (quantized on load).
inline GemmParams check_common(const char* op, const at::Tensor& a, const at::Tensor& a_scale,
                               const at::Tensor& w, const at::Tensor& w_scale,
                               const std::optional<at::Tensor>& bias, int64_t n, bool emulated,
                               bool float_a = false) {
  const auto dev = a.device();
  if (emulated) {
    TORCH_CHECK_VALUE(dev.is_cpu(), op, " (cuda-emulated) runs on CPU tensors; a is on ", dev);
  } else {
    TORCH_CHECK_VALUE(dev.is_cuda(), op, " (cuda) needs CUDA tensors; a is on ", dev);
  }
  for (const at::Tensor* t : {&a_scale, &w, &w_scale})
    TORCH_CHECK_VALUE(t->device() == dev, op, ": all inputs must be on ", dev, ", got one on ", t->device());
  if (float_a) {
    TORCH_CHECK_TYPE(a.scalar_type() == at::kChar || ditq::binding_messages::is_float_dtype(a.scalar_type()), op,
                     ": a must be int8, float16, bfloat16, float32; got ",
                     ditq::binding_messages::dtype_name(a.scalar_type()));
  } else {
    TORCH_CHECK_TYPE(a.scalar_type() == at::kChar, op, ": a must be int8, got ", a.scalar_type());
  }
  TORCH_CHECK_VALUE(a.dim() == 2 && a.is_contiguous(), op, ": a must be a contiguous [M, K] tensor");
  const int64_t m = a.size(0), k = a.size(1);
  TORCH_CHECK_VALUE(k > 0 && k % ditq::gemm::kKMultiple == 0, op, ": the CUDA kernels copy rows in 16-byte "
                    "pieces, so K must be a positive multiple of ", ditq::gemm::kKMultiple, "; got K = ", k,
                    " (pad the layer's inputs)");
  TORCH_CHECK_VALUE(k <= ditq::gemm::kMaxK, op, ": K = ", k, " exceeds ", ditq::gemm::kMaxK,
                    ", the largest K ditq's int8 GEMMs take");
  TORCH_CHECK_VALUE(m < (int64_t{1} << 30) && n < (int64_t{1} << 26), op, ": M = ", m, ", N = ", n,
                    " exceed the launch grid (M < 2^30, N < 2^26)");
  TORCH_CHECK_VALUE(aligned16(a) && aligned16(w), op, ": a and w must start at 16-byte aligned addresses "
                    "(a view with a storage offset is not; call .clone())");
  TORCH_CHECK_TYPE(a_scale.scalar_type() == at::kFloat && w_scale.scalar_type() == at::kFloat, op,
                   ": a_scale and w_scale must be float32");
  TORCH_CHECK_VALUE(a_scale.dim() == 1 && (a_scale.numel() == 1 || a_scale.numel() == m) &&
                    a_scale.is_contiguous(), op, ": a_scale must be float32 [1] or [M] = [", m, "]");
  if (a.scalar_type() != at::kChar)  // only with float_a: the dtype check above refused it otherwise
    ditq::binding_messages::check_float_a_static_scale(op, a_scale);
  TORCH_CHECK_VALUE(w_scale.is_contiguous(), op, ": w_scale must be contiguous");
  if (bias) {
    TORCH_CHECK_VALUE(bias->device() == dev, op, ": bias must be on ", dev);
    TORCH_CHECK_TYPE(bias->is_floating_point(), op, ": bias must be a float tensor");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be [N] = [", n, "]");
  }
  GemmParams p{};
  p.a = a.data_ptr();
  p.a_scale = a_scale.data_ptr<float>();
  p.a_scale_per_token = a_scale.numel() == m && m != 1 ? 1 : 0;
  p.M = static_cast<int>(m);
  p.N = static_cast<int>(n);
  p.K = static_cast<int>(k);
  return p;
}

inline int resolve_tile(int64_t tile, int arch, int64_t m, bool w4) {  // tile < 0: the table's choice
  if (tile >= ditq::gemm::kSm90TileBase) {
    const int count = w4 ? ditq::gemm::kSm90W4TileCount : ditq::gemm::kSm90W8TileCount;
    TORCH_CHECK_VALUE(tile < ditq::gemm::kSm90TileBase + count, "GEMM tile ", tile, " is not in the Hopper ",
                      w4 ? "W4A8" : "W8A8", " table (ids ", ditq::gemm::kSm90TileBase, "..",
                      ditq::gemm::kSm90TileBase + count - 1, ")");
    return static_cast<int>(tile);
  }
  if (tile >= 0) {
    TORCH_CHECK_VALUE(tile < ditq::gemm::tile_count(), "GEMM tile ", tile, " is not in the table (",
                      ditq::gemm::tile_count(), " tiles)");
    return static_cast<int>(tile);
  }
  const int t = ditq::gemm::pick_tile(arch, clamp_m(m), w4);
  TORCH_CHECK_VALUE(t >= 0, "the int8 GEMMs need compute capability 8.0 or newer (mma.sync m16n8k32); this GPU "
                    "is sm_", arch);
  return t;
}

// With no GPU to ask, the emulated kernels choose tiles and splits as on an H100 SXM (sm_90, 132 SMs), so
// calls through the op exercise what a GPU would run.
constexpr int kEmulatedArch = 90, kEmulatedSmCount = 132;

// The SM count the emulated launches schedule for: kEmulatedSmCount unless a test sets another
// (ditq.emulator.emulator_options(sm_count=...): the ops emulator_set_sm_count / emulator_get_sm_count below),
// so that a schedule of full waves plus a split tail (sm90_auto_schedule) takes a handful of tiles instead of
// 133 or more, which the emulator would run for minutes. Process-wide, like the emulator's other options.
inline int& emulated_sm_count() {
  static int count = kEmulatedSmCount;
  return count;
}
inline void set_emulated_sm_count(int64_t n) {
  TORCH_CHECK_VALUE(n >= 1 && n <= 1024, "emulator sm_count must be in [1, 1024], got ", n);
  emulated_sm_count() = static_cast<int>(n);
}

// The split count of an mma.sync launch: automatic (splits < 0: auto_splits, at most `max_splits`, the cap of the
// rule that picked the tile) or forced (checked against the tile's k units).
inline int resolve_splits(int64_t splits, int tile, int group, const GemmParams& p, int sm_count, int max_splits) {
  const int units = ditq::gemm::k_units(tile, group, p.K);
  if (splits < 0) return ditq::gemm::auto_splits(tile, group, p.M, p.N, p.K, sm_count, max_splits);
  TORCH_CHECK_VALUE(splits >= 1 && splits <= units, "split-K count must be in [1, ", units, "] (the number of ",
                    "k units for this tile and group size), got ", splits);
  return static_cast<int>(splits);
}

// The split-K workspace and counters of a launch with p.splits > 1 on tiles of bm x bn (mma.sync or Hopper: the
// kernels index it the same way, BM x BN words per split tile and split): counters zeroed (the kernels leave
// them zeroed), the workspace poisoned under the emulator (a partial read before it is stored shows).
// `split_tiles`: how many tiles are split (the Hopper schedule's tail; < 0: all of them, the mma.sync kernels).
inline void alloc_splits(GemmParams& p, const at::Tensor& a, int bm, int bn, bool emulated, at::Tensor& counters,
                         at::Tensor& workspace, int64_t split_tiles = -1) {
  if (p.splits <= 1) return;
  const int64_t tiles = split_tiles >= 0 ? split_tiles : int64_t{(p.M + bm - 1) / bm} * ((p.N + bn - 1) / bn);
  counters = at::zeros({tiles}, a.options().dtype(at::kInt));
  workspace = at::empty({p.splits * tiles * bm * bn}, a.options().dtype(at::kInt));
  if (emulated) workspace.fill_(-1);
  p.counters = counters.data_ptr<int>();
  p.workspace = reinterpret_cast<uint32_t*>(workspace.data_ptr<int>());
}

// ---- Hopper (sm_90a) dispatch: csrc/gemm_sm90.cuh ------------------------------------------------------------
// The Hopper kernels run a problem when asked for by tile id (kSm90TileBase + i, with any split count), or
// automatically (tile and split count automatic, or splits = 1) on an sm_90 GPU this build has sm_90a code for,
// or in the emulator under emulator_options(arch="sm_90a"), when they accept it (TMA's alignment rules,
// sm90_accepts) and the table has a Hopper tile for the M bucket. Anything else runs the mma.sync kernels, which
// also run on sm_90.
// The same rule holds for the plain GEMMs and for the fused ones with an int8 a (the Hopper kernels carry
// FusedEpilogue too: gemm_sm90_fused.cu); a fused GEMM with a float a always runs the mma.sync float-A kernel
// (it quantizes A as it loads it with pointer loads; TMA copies bytes and cannot).
// Returns the Hopper tile id, or -1.
inline int sm90_tile_for(const char* op, const GemmParams& p, bool w4, int64_t tile, int64_t splits, int arch,
                         bool emulated) {
  const bool accepts = ditq::gemm::sm90_accepts(p.K, w4, reinterpret_cast<uintptr_t>(p.a),
                                                reinterpret_cast<uintptr_t>(p.w));
  if (tile >= ditq::gemm::kSm90TileBase) {
    resolve_tile(tile, arch, p.M, w4);  // checks the id (the split count: run_sm90)
    TORCH_CHECK_VALUE(accepts, op, ": the Hopper tiles load by TMA, which needs 16-byte aligned rows and K % 16 "
                      "== 0 (K = ", p.K, ")");
    if (!emulated) {
#if DITQ_WITH_CUDA
      TORCH_CHECK_VALUE(arch == 90 && ditq::gemm_sm90_available(), op, ": Hopper tile ", tile, " needs an sm_90 "
                        "GPU and a build with sm_90a code (TORCH_CUDA_ARCH_LIST=9.0a); this GPU is sm_", arch);
#endif
    }
    return static_cast<int>(tile);
  }
  if (tile >= 0 || splits > 1 || !accepts || arch != 90) return -1;
#if DITQ_WITH_CUDA
  if (!emulated && !ditq::gemm_sm90_available()) return -1;
#endif
  const int i = ditq::gemm::pick_sm90_tile(clamp_m(p.M), w4);
  return i < 0 ? -1 : ditq::gemm::kSm90TileBase + i;
}

// The Hopper schedule of a launch of `tiles` tiles and `units` k units for M rows: automatic (splits < 0, capped by
// M's bucket) or forced on the last wave (splits >= 1, checked by the caller). The launch and the
// gemm_sm90_schedule op both go through here.
inline ditq::gemm::Sm90Schedule sm90_schedule_for(int64_t tiles, int units, int sm_count, int64_t m,
                                                  int64_t splits) {
  if (splits >= 1) return ditq::gemm::sm90_forced_schedule(tiles, static_cast<int>(splits), sm_count);
  return ditq::gemm::sm90_auto_schedule(tiles, units, sm_count, ditq::gemm::sm90_max_splits(clamp_m(m)));
}

// Allocates y (and the split-K workspace), launches (or emulates) the Hopper tile `t` and checks the launch.
// splits < 0: automatic (sm90_auto_schedule, configs/gemm_tiles_sm90.h: full waves whole, the last partial wave's
// tiles split, at most the M bucket's max_splits ways); else 1 .. the k units of the tile, forced on the last wave
// (sm90_forced_schedule: its tiles split that many ways, full waves before it whole; under one wave every tile).
// `fused`: the FusedEpilogue instantiation (p.fused filled in; it runs once, in the last CTA of a split tile);
// out_dtype is then int8 when p.fused.out_scale is set.
inline at::Tensor run_sm90(const char* op, GemmParams p, const at::Tensor& a, at::ScalarType out_dtype, int group,
                           int t, int64_t splits, int sm_count, bool emulated, bool fused) {
  const int i = t - ditq::gemm::kSm90TileBase;
  int s[7];
  ditq::gemm::sm90_tile_shape(i, group > 0, s);
  const int units = ditq::gemm::sm90_k_units(group, p.K);
  const int64_t tiles = static_cast<int64_t>((p.M + s[0] - 1) / s[0]) * ((p.N + s[1] - 1) / s[1]);
  if (splits >= 0)
    TORCH_CHECK_VALUE(splits >= 1 && splits <= units, op, ": split-K count must be in [1, ", units, "] (the "
                      "number of k units of ", group > 128 ? group : 128, " for the Hopper tiles at K = ", p.K,
                      "), got ", splits);
  const ditq::gemm::Sm90Schedule sched = sm90_schedule_for(tiles, units, sm_count, p.M, splits);
  const int64_t ctas = ditq::gemm::sm90_ctas(tiles, sched);
  TORCH_CHECK_VALUE(ctas <= std::numeric_limits<int>::max(), op, ": M = ", p.M, ", N = ", p.N, " with ",
                    sched.splits, " splits needs ", ctas, " CTAs of ", s[0], " x ", s[1], ", more than the launch "
                    "grid's 2^31 - 1; split the batch");
  p.splits = sched.splits;
  p.dp_tiles = static_cast<int>(sched.dp_tiles);
  at::Tensor y = at::empty({p.M, p.N}, a.options().dtype(out_dtype));
  p.out = y.data_ptr();
  at::Tensor counters, workspace;
  alloc_splits(p, a, s[0], s[1], emulated, counters, workspace, ditq::gemm::sm90_split_tiles(tiles, sched));
  if (emulated) {
    // poison: an unwritten element shows as NaN (-128 for int8: never a quantizer output)
    if (out_dtype == at::kChar) y.fill_(-128);
    else y.fill_(std::numeric_limits<float>::quiet_NaN());
    if (fused) {
      if (group > 0) ditq::gemm_w4a8_sm90_fused_emulated({p, group, i});
      else ditq::gemm_w8a8_sm90_fused_emulated({p, 0, i});
    } else {
      if (group > 0) ditq::gemm_w4a8_sm90_emulated({p, group, i});
      else ditq::gemm_w8a8_sm90_emulated({p, 0, i});
    }
    return y;
  }
#if DITQ_WITH_CUDA
  void* stream = at::cuda::getCurrentCUDAStream().stream();
  const char* err = fused ? (group > 0 ? ditq::gemm_w4a8_sm90_fused_cuda({p, group, i}, stream)
                                       : ditq::gemm_w8a8_sm90_fused_cuda({p, 0, i}, stream))
                          : (group > 0 ? ditq::gemm_w4a8_sm90_cuda({p, group, i}, stream)
                                       : ditq::gemm_w8a8_sm90_cuda({p, 0, i}, stream));
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err ? err : "");
  return y;
#else
  TORCH_CHECK(false, op, ": this build of ditq has no CUDA kernels (built without nvcc / CUDA torch)");
#endif
}

// Runs one GEMM: allocates y (and the split-K workspace), picks the tile, launches on the current stream (or
// emulates) and checks the launch.
// `fused`: launch the fused-epilogue instantiation (p.fused filled in by check_fused); its output is int8 when
// p.fused.out_scale is set.
inline at::Tensor run(const char* op, GemmParams p, const at::Tensor& a, const std::optional<at::Tensor>& bias,
                      at::ScalarType out_dtype, int group, int64_t tile, int64_t splits, bool emulated,
                      bool fused = false) {
  p.out_dtype = out_dtype_of(out_dtype);
  const bool int8_out = fused && p.fused.out_scale != nullptr;
  if (int8_out) out_dtype = at::kChar;
  at::Tensor bias32;
  if (bias) {
    bias32 = bias->to(at::kFloat).contiguous();  // the epilogue reads fp32 (a no-op for fp32 bias)
    p.bias = bias32.data_ptr<float>();
  }
  int arch = kEmulatedArch, sm_count = emulated_sm_count();
#if DITQ_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (!emulated) {
    guard.emplace(a.device());
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    arch = prop->major * 10 + prop->minor;
    sm_count = prop->multiProcessorCount;
  }
#endif
  if (p.M == 0 || p.N == 0) return at::empty({p.M, p.N}, a.options().dtype(out_dtype));  // nothing to launch
  // A float `a` (fused only) runs the float-A instantiations, built for the one tile float_a_tile: never the
  // Hopper kernels (TMA cannot quantize on load; a forced Hopper tile is refused below like any other tile).
  const bool float_a = a.scalar_type() != at::kChar;
  if (!float_a) {
    const int run_arch = emulated ? ditq::emulated_gemm_arch() : arch;
    // Integer group scales: only the Hopper kernels apply them (before the wgmma); a forced split count picks
    // the Hopper tile of M's bucket instead of the mma.sync path that forcing a count means for float scales.
    const int64_t sm90_splits = p.w_qscale && tile < 0 ? -1 : splits;
    const int hopper = sm90_tile_for(op, p, group > 0, tile, sm90_splits, run_arch, emulated);
    if (hopper >= 0) return run_sm90(op, p, a, out_dtype, group, hopper, splits, sm_count, emulated, fused);
  }
  // Integer group scales where the Hopper kernels do not run (another GPU, a float a, a forced mma.sync tile, the
  // emulator not set to sm_90a): the mma.sync kernels fold float group scales, so they get q * s as float32
  // [K // G, N] (one elementwise pass; exact when s has at most 19 significant bits, as ditq's quantizer makes it).
  at::Tensor derived_scales;  // alive until the launch is queued; the caching allocator orders its reuse
  if (p.w_qscale) {
    const int64_t groups = p.K / group;
    const at::Tensor q = at::from_blob(const_cast<int32_t*>(p.w_qscale), {groups, p.N}, a.options().dtype(at::kInt));
    const at::Tensor sc = at::from_blob(const_cast<float*>(p.w_scale), {1, p.N}, a.options().dtype(at::kFloat));
    derived_scales = q.to(at::kFloat).mul_(sc).contiguous();
    p.w_scale = derived_scales.data_ptr<float>();
    p.w_qscale = nullptr;
  }
  if (float_a) {
    const int ft = ditq::gemm::float_a_tile(group > 0);
    TORCH_CHECK_VALUE(tile < 0 || tile == ft, op, ": a float a runs on GEMM tile ", ft, " only (its kernels, which "
                      "quantize a as they load it, are built for the smallest-M tile), got tile ", tile);
    tile = ft;
  }
  const int t = resolve_tile(tile, arch, p.M, group > 0);
  {
    int s[7];
    ditq::gemm::tile_shape(t, s);
    TORCH_CHECK_VALUE((p.M + s[0] - 1) / s[0] <= 65535, op, ": M = ", p.M, " needs more than 65535 row tiles of ",
                      s[0], " (the launch grid's y limit); split the batch");
  }
  // The automatic count's cap comes from the rule that picks the tile: the float-A tile's own rule
  // (float_a_max_splits), else the rule of this GPU's arch and M (a forced tile with an automatic count: M's
  // bucket's cap, as the Hopper schedule does).
  const int cap = float_a ? ditq::gemm::float_a_max_splits()
                          : ditq::gemm::max_splits(arch, clamp_m(p.M));
  p.splits = resolve_splits(splits, t, group, p, sm_count, cap);
  at::Tensor y = at::empty({p.M, p.N}, a.options().dtype(out_dtype));
  p.out = y.data_ptr();
  at::Tensor counters, workspace;
  {
    int s[7];
    ditq::gemm::tile_shape(t, s);
    alloc_splits(p, a, s[0], s[1], emulated, counters, workspace);
  }
  if (emulated) {
    // poison: an unwritten element shows as NaN (-128 for int8: never a quantizer output)
    if (int8_out) y.fill_(-128);
    else y.fill_(std::numeric_limits<float>::quiet_NaN());
    if (float_a) {
      ditq::gemm_fused_float_a_emulated({p, group, t, true, out_dtype_of(a.scalar_type())});
    } else if (fused) {
      if (group > 0) ditq::gemm_w4a8_fused_emulated({p, group, t});
      else ditq::gemm_w8a8_fused_emulated({p, 0, t});
    } else {
      if (group > 0) ditq::gemm_w4a8_emulated({p, group, t});
      else ditq::gemm_w8a8_emulated({p, 0, t});
    }
    return y;
  }
#if DITQ_WITH_CUDA
  void* stream = at::cuda::getCurrentCUDAStream().stream();
  const char* err = float_a ? ditq::gemm_fused_float_a_cuda({p, group, t, true, out_dtype_of(a.scalar_type())},
                                                            stream)
                  : fused ? (group > 0 ? ditq::gemm_w4a8_fused_cuda({p, group, t}, stream)
                                       : ditq::gemm_w8a8_fused_cuda({p, 0, t}, stream))
                          : (group > 0 ? ditq::gemm_w4a8_cuda({p, group, t}, stream)
                                       : ditq::gemm_w8a8_cuda({p, 0, t}, stream));
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err ? err : "");
  return y;
#else
  TORCH_CHECK(false, op, ": this build of ditq has no CUDA kernels (built without nvcc / CUDA torch)");
#endif
}

// ---- the fused epilogue's inputs (gemm_*_fused) -------------------------------------------------------------
// Tensors the kernel reads that the caller's tensors could not be used for directly (a gate in fp16 / bf16,
// a misaligned residual): kept alive here until the launch has been issued (the caching allocator keeps
// their memory stream-ordered after that).
struct FusedInputs {
  at::Tensor gate, residual;
};

// The texts follow ditq/ops.py's check of the same arguments (one message per mistake on every backend).
inline void check_fused(const char* op, GemmParams& p, FusedInputs& keep, const at::Tensor& a, bool gelu,
                        const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& residual,
                        int64_t rows_per_gate, const std::optional<at::Tensor>& out_scale,
                        at::ScalarType out_dtype, bool emulated) {
  namespace msg = ditq::binding_messages;
  const int64_t m = p.M, n = p.N;
  const auto dev = a.device();
  GemmParams::Fused f{};
  f.gelu = gelu ? 1 : 0;
  f.rows_per_gate = 1;
  TORCH_CHECK_VALUE(rows_per_gate >= 1, op, ": rows_per_gate must be an int >= 1, got ", rows_per_gate);
  if (gate) {
    msg::check_float(op, "gate", *gate);
    TORCH_CHECK_VALUE(m % rows_per_gate == 0, op, ": M = ", m, " must be a multiple of rows_per_gate = ",
                      rows_per_gate, " (the rows of one gate row)");
    TORCH_CHECK_VALUE(gate->dim() == 2 && gate->size(0) == m / rows_per_gate && gate->size(1) == n, op,
                      ": gate must be [M // rows_per_gate, N] = [", m / rows_per_gate, ", ", n, "], got ",
                      gate->sizes());
    TORCH_CHECK_VALUE(gate->is_contiguous(), op, ": gate must be contiguous (call .contiguous() first)");
  }
  if (residual) {
    TORCH_CHECK_TYPE(residual->scalar_type() == out_dtype, op, ": residual must be ", msg::dtype_name(out_dtype),
                     "; got ", msg::dtype_name(residual->scalar_type()));
    TORCH_CHECK_VALUE(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n, op,
                      ": residual must be [M, N] = [", m, ", ", n, "], got ", residual->sizes());
    TORCH_CHECK_VALUE(residual->is_contiguous(), op, ": residual must be contiguous (call .contiguous() first)");
  }
  if (out_scale) {
    TORCH_CHECK_TYPE(out_scale->scalar_type() == at::kFloat, op, ": out_scale must be float32; got ",
                     msg::dtype_name(out_scale->scalar_type()));
    TORCH_CHECK_VALUE(out_scale->dim() == 1 && out_scale->size(0) == 1, op, ": out_scale must be a static scale, "
                      "float32 [1], got shape ", out_scale->sizes());
  }
  if (gate) msg::check_same_device(op, "gate", *gate, dev);
  if (residual) msg::check_same_device(op, "residual", *residual, dev);
  if (out_scale) {
    msg::check_same_device(op, "out_scale", *out_scale, dev);
    // its value is checked only where reading it is free (the emulated build's CPU tensor): on a GPU it would
    // synchronize every call
    if (emulated) {
      const float s = out_scale->item<float>();
      TORCH_CHECK_VALUE(std::isfinite(s) && s > 0.0f, op, ": out_scale must be positive and finite, got ", s);
    }
  }
  if (gate) {
    keep.gate = gate->to(at::kFloat);  // exact for fp16 / bf16; [M // rows_per_gate, N] is small
    if (!aligned16(keep.gate)) keep.gate = keep.gate.clone();
    f.gate = keep.gate.data_ptr<float>();
    f.rows_per_gate = static_cast<int>(m > 0 ? rows_per_gate : 1);  // <= M < 2^30 when M > 0
  }
  if (residual) {
    keep.residual = aligned16(*residual) ? *residual : residual->clone();
    f.residual = keep.residual.data_ptr();
    f.residual_dtype = out_dtype_of(out_dtype);
  }
  if (out_scale) f.out_scale = out_scale->data_ptr<float>();
  p.fused = f;
}

// The weight checks of the W8 and W4 GEMMs (plain and fused alike), then check_common: the launch
// parameters with a, w and their scales filled in.
inline GemmParams check_w8(const char* op, const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, bool emulated,
                           bool float_a = false) {
  TORCH_CHECK_TYPE(w.scalar_type() == at::kChar, op, ": w must be int8, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.is_contiguous() && a.dim() == 2 && w.size(1) == a.size(1), op,
                    ": w must be a contiguous int8 [N, K] tensor with K = a.shape[1]");
  const int64_t n = w.size(0);
  GemmParams p = check_common(op, a, a_scale, w, w_scale, bias, n, emulated, float_a);
  TORCH_CHECK_VALUE(w_scale.dim() == 1 && w_scale.size(0) == n, op, ": w_scale must be float32 [N] = [", n, "]");
  p.w = w.data_ptr();
  p.w_scale = w_scale.data_ptr<float>();
  return p;
}

inline GemmParams check_w4i(const char* op, const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                            const at::Tensor& w_qscale, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, int64_t group_size, bool emulated,
                            bool float_a = false);

// The packed int4 weight against its group scales (float or integer, [K // group_size, N], 2-D: checked by the
// caller, named `scales_name` in the messages): uint8 [N, K // 2] in the split-nibble layout and K a multiple of the
// group. Returns N.
inline int64_t check_w4_weight(const char* op, const at::Tensor& a, const at::Tensor& w, const at::Tensor& scales,
                               const char* scales_name, int64_t group_size) {
  TORCH_CHECK_TYPE(w.scalar_type() == at::kByte, op, ": w must be uint8 (two int4 per byte), got ",
                   w.scalar_type());
  const int64_t n = scales.size(1), k = a.dim() == 2 ? a.size(1) : -1;
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == n && w.size(1) * 2 == k && w.is_contiguous(), op,
                    ": w must be a contiguous uint8 [N, K // 2] = [", n, ", ", k / 2, "] tensor in the CUDA "
                    "split-nibble layout (ditq.backends.cuda_layout), got shape ", w.sizes());
  TORCH_CHECK_VALUE(k % group_size == 0 && scales.size(0) == k / group_size, op, ": K = ", k,
                    " must be a multiple of group_size ", group_size, " and ", scales_name, " [K // group_size, N]");
  return n;
}

inline GemmParams check_w4(const char* op, const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t group_size,
                           bool emulated, bool float_a = false) {
  TORCH_CHECK_VALUE(ditq::gemm::is_w4_group_size(group_size), op, ": group_size must be one of ",
                    group_sizes_text(), " (the sizes this build's kernels were compiled for), got ", group_size);
  if (w_scale.scalar_type() == at::kInt) {
    // Integer group scales in the CUDA backend's prepared layout (ditq.backends.cuda_layout): int32
    // [K // group_size + 1, N], the group scales q then, in the last row, the channel scales' float32 bits.
    const int64_t k = a.dim() == 2 ? a.size(1) : -1, groups = k > 0 && k % group_size == 0 ? k / group_size : -1;
    TORCH_CHECK_VALUE(groups > 0 && w_scale.dim() == 2 && w_scale.size(0) == groups + 1 && w_scale.is_contiguous(),
                      op, ": int32 w_scale (integer group scales) must be a contiguous [K // group_size + 1, N] "
                      "tensor: q rows, then the channel scales' float32 bits (K = ", k, ")");
    return check_w4i(op, a, a_scale, w, w_scale.narrow(0, 0, groups), w_scale.select(0, groups).view(at::kFloat),
                     bias, group_size, emulated, float_a);
  }
  TORCH_CHECK_TYPE(w.scalar_type() == at::kByte, op, ": w must be uint8 (two int4 per byte), got ",
                   w.scalar_type());  // before w_scale's shape (check_w4_weight checks it again)
  TORCH_CHECK_VALUE(w_scale.dim() == 2, op, ": w_scale must be float32 [K // group_size, N]");
  const int64_t n = check_w4_weight(op, a, w, w_scale, "w_scale", group_size);
  GemmParams p = check_common(op, a, a_scale, w, w_scale, bias, n, emulated, float_a);
  p.w = w.data_ptr();
  p.w_scale = w_scale.data_ptr<float>();
  return p;
}

// W4A8 with integer group scales (two-level): w as check_w4's, w_qscale int32 [K // group_size, N] holding
// q in [1, 16] (checked here on CPU tensors; on a GPU reading them would cost a synchronization, so the values
// are the caller's contract, as the float scales' are), w_scale float32 [N] per output channel.
inline GemmParams check_w4i(const char* op, const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                            const at::Tensor& w_qscale, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, int64_t group_size, bool emulated, bool float_a) {
  TORCH_CHECK_VALUE(ditq::gemm::is_w4_group_size(group_size), op, ": group_size must be one of ",
                    group_sizes_text(), " (the sizes this build's kernels were compiled for), got ", group_size);
  TORCH_CHECK_TYPE(w_qscale.scalar_type() == at::kInt, op, ": w_qscale must be int32, got ",
                   w_qscale.scalar_type());
  TORCH_CHECK_VALUE(w_qscale.dim() == 2 && w_qscale.is_contiguous(), op,
                    ": w_qscale must be a contiguous int32 [K // group_size, N] tensor");
  const int64_t n = check_w4_weight(op, a, w, w_qscale, "w_qscale", group_size);
  GemmParams p = check_common(op, a, a_scale, w, w_scale, bias, n, emulated, float_a);
  TORCH_CHECK_VALUE(w_qscale.device() == a.device(), op, ": w_qscale must be on ", a.device());
  TORCH_CHECK_VALUE(w_scale.dim() == 1 && w_scale.size(0) == n, op, ": w_scale must be float32 [N] = [", n,
                    "] (one scale per output channel; the group scales are w_qscale)");
  if (w_qscale.device().is_cpu() && w_qscale.numel() > 0) {
    const auto lo = w_qscale.min().item<int32_t>(), hi = w_qscale.max().item<int32_t>();
    TORCH_CHECK_VALUE(lo >= 1 && hi <= ditq::gemm::kMaxIntGroupScale, op, ": w_qscale values must lie in [1, ",
                      ditq::gemm::kMaxIntGroupScale, "] (q * w must fit int8 and the unpack's bytes must not ",
                      "carry), got [", lo, ", ", hi, "]");
  }
  p.w = w.data_ptr();
  p.w_scale = w_scale.data_ptr<float>();
  p.w_qscale = w_qscale.data_ptr<int32_t>();
  return p;
}

inline at::Tensor gemm_w8a8(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                            at::ScalarType out_dtype, int64_t tile, int64_t splits, bool emulated) {
  GemmParams p = check_w8("gemm_w8a8", a, a_scale, w, w_scale, bias, emulated);
  return run("gemm_w8a8", p, a, bias, out_dtype, 0, tile, splits, emulated);
}

inline at::Tensor gemm_w4a8(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t group_size,
                            at::ScalarType out_dtype, int64_t tile, int64_t splits, bool emulated) {
  GemmParams p = check_w4("gemm_w4a8", a, a_scale, w, w_scale, bias, group_size, emulated);
  return run("gemm_w4a8", p, a, bias, out_dtype, static_cast<int>(group_size), tile, splits, emulated);
}

// The fused GEMMs after their weight checks: the epilogue pieces' checks (the output dtype first: the residual is
// compared with it), then run's fused instantiation; `keep` holds what check_fused converted until the launch.
inline at::Tensor run_fused(const char* op, GemmParams p, const at::Tensor& a, const std::optional<at::Tensor>& bias,
                            bool gelu, const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& residual,
                            int64_t rows_per_gate, const std::optional<at::Tensor>& out_scale,
                            at::ScalarType out_dtype, int group, int64_t tile, int64_t splits, bool emulated) {
  out_dtype_of(out_dtype);
  FusedInputs keep;
  check_fused(op, p, keep, a, gelu, gate, residual, rows_per_gate, out_scale, out_dtype, emulated);
  return run(op, p, a, bias, out_dtype, group, tile, splits, emulated, true);
}

inline at::Tensor gemm_w4a8i(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                             const at::Tensor& w_qscale, const at::Tensor& w_scale,
                             const std::optional<at::Tensor>& bias, int64_t group_size, at::ScalarType out_dtype,
                             int64_t tile, int64_t splits, bool emulated) {
  GemmParams p = check_w4i("gemm_w4a8i", a, a_scale, w, w_qscale, w_scale, bias, group_size, emulated, false);
  return run("gemm_w4a8i", p, a, bias, out_dtype, static_cast<int>(group_size), tile, splits, emulated);
}

inline at::Tensor gemm_w4a8i_fused(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                                   const at::Tensor& w_qscale, const at::Tensor& w_scale,
                                   const std::optional<at::Tensor>& bias, int64_t group_size, bool gelu,
                                   const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& residual,
                                   int64_t rows_per_gate, const std::optional<at::Tensor>& out_scale,
                                   at::ScalarType out_dtype, int64_t tile, int64_t splits, bool emulated) {
  const char* op = "gemm_w4a8i_fused";
  GemmParams p = check_w4i(op, a, a_scale, w, w_qscale, w_scale, bias, group_size, emulated,
                           a.scalar_type() != at::kChar);
  return run_fused(op, p, a, bias, gelu, gate, residual, rows_per_gate, out_scale, out_dtype,
                   static_cast<int>(group_size), tile, splits, emulated);
}

template <bool EMULATED>
at::Tensor gemm_w4a8i_op(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                         const at::Tensor& w_qscale, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                         int64_t group_size, at::ScalarType out_dtype, int64_t tile, int64_t splits) {
  return gemm_w4a8i(a, a_scale, w, w_qscale, w_scale, bias, group_size, out_dtype, tile, splits, EMULATED);
}

template <bool EMULATED>
at::Tensor gemm_w4a8i_fused_op(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                               const at::Tensor& w_qscale, const at::Tensor& w_scale,
                               const std::optional<at::Tensor>& bias, int64_t group_size, bool gelu,
                               const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& residual,
                               int64_t rows_per_gate, const std::optional<at::Tensor>& out_scale,
                               at::ScalarType out_dtype, int64_t tile, int64_t splits) {
  return gemm_w4a8i_fused(a, a_scale, w, w_qscale, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate,
                          out_scale, out_dtype, tile, splits, EMULATED);
}

inline at::Tensor gemm_w8a8_fused(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                                  const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, bool gelu,
                                  const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& residual,
                                  int64_t rows_per_gate, const std::optional<at::Tensor>& out_scale,
                                  at::ScalarType out_dtype, int64_t tile, int64_t splits, bool emulated) {
  const char* op = "gemm_w8a8_fused";
  GemmParams p = check_w8(op, a, a_scale, w, w_scale, bias, emulated, true);
  return run_fused(op, p, a, bias, gelu, gate, residual, rows_per_gate, out_scale, out_dtype, 0, tile, splits,
                   emulated);
}

inline at::Tensor gemm_w4a8_fused(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                                  const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                  int64_t group_size, bool gelu, const std::optional<at::Tensor>& gate,
                                  const std::optional<at::Tensor>& residual, int64_t rows_per_gate,
                                  const std::optional<at::Tensor>& out_scale, at::ScalarType out_dtype,
                                  int64_t tile, int64_t splits, bool emulated) {
  const char* op = "gemm_w4a8_fused";
  GemmParams p = check_w4(op, a, a_scale, w, w_scale, bias, group_size, emulated, true);
  return run_fused(op, p, a, bias, gelu, gate, residual, rows_per_gate, out_scale, out_dtype,
                   static_cast<int>(group_size), tile, splits, emulated);
}

template <bool EMULATED>
at::Tensor gemm_w8a8_fused_op(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                              const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, bool gelu,
                              const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& residual,
                              int64_t rows_per_gate, const std::optional<at::Tensor>& out_scale,
                              at::ScalarType out_dtype, int64_t tile, int64_t splits) {
  return gemm_w8a8_fused(a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale, out_dtype,
                         tile, splits, EMULATED);
}

template <bool EMULATED>
at::Tensor gemm_w4a8_fused_op(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                              const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t group_size,
                              bool gelu, const std::optional<at::Tensor>& gate,
                              const std::optional<at::Tensor>& residual, int64_t rows_per_gate,
                              const std::optional<at::Tensor>& out_scale, at::ScalarType out_dtype, int64_t tile,
                              int64_t splits) {
  return gemm_w4a8_fused(a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate, out_scale,
                         out_dtype, tile, splits, EMULATED);
}

template <bool EMULATED>
at::Tensor gemm_w8a8_op(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                        const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                        int64_t tile, int64_t splits) {
  return gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype, tile, splits, EMULATED);
}

template <bool EMULATED>
at::Tensor gemm_w4a8_op(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                        const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t group_size,
                        at::ScalarType out_dtype, int64_t tile, int64_t splits) {
  return gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype, tile, splits, EMULATED);
}

inline std::vector<int64_t> tile_info(int64_t tile) {  // {BM, BN, BK, WARPS_M, WARPS_N, STAGES, THREADS}
  TORCH_CHECK_VALUE(tile >= 0 && tile < ditq::gemm::tile_count(), "no GEMM tile ", tile);
  int s[7];
  ditq::gemm::tile_shape(static_cast<int>(tile), s);
  return std::vector<int64_t>(s, s + 7);
}

// {BM, BN, BK, STAGES, CONSUMERS, THREADS, smem bytes} of Hopper tile id `tile` (kSm90TileBase + i).
inline std::vector<int64_t> sm90_tile_info(int64_t tile, bool w4) {
  int s[7];
  const int64_t i = tile - ditq::gemm::kSm90TileBase;
  TORCH_CHECK_VALUE(i >= 0 && i < 1024 && ditq::gemm::sm90_tile_shape(static_cast<int>(i), w4, s), "no Hopper ",
                    w4 ? "W4A8" : "W8A8", " GEMM tile ", tile);
  return std::vector<int64_t>(s, s + 7);
}

// [dp_tiles, splits] of the Hopper schedule (configs/gemm_tiles_sm90.h) the binding runs for `tiles` output tiles of
// `units` k units on `sm_count` SMs, for tests and the static report's model of it: splits < 0 automatic
// (sm90_auto_schedule, capped by the max_splits of M's bucket; m < 0: kSm90MaxSplits), else forced
// (sm90_forced_schedule, 1 .. units).
inline std::vector<int64_t> sm90_schedule(int64_t tiles, int64_t units, int64_t sm_count, int64_t m,
                                          int64_t splits) {
  TORCH_CHECK_VALUE(tiles >= 0 && units >= 1 && units <= (1 << 20) && sm_count >= 1 && sm_count <= 1024,
                    "gemm_sm90_schedule: tiles >= 0, units in [1, 2^20], sm_count in [1, 1024]");
  TORCH_CHECK_VALUE(splits < 0 || (splits >= 1 && splits <= units), "gemm_sm90_schedule: a forced split count ",
                    "must be in [1, ", units, "] (the k units), got ", splits);
  const ditq::gemm::Sm90Schedule s =
      m < 0 && splits < 0
          ? ditq::gemm::sm90_auto_schedule(tiles, static_cast<int>(units), static_cast<int>(sm_count))
          : sm90_schedule_for(tiles, static_cast<int>(units), static_cast<int>(sm_count), m, splits);
  return {s.dp_tiles, s.splits};
}

// Whether the current CUDA device runs the Hopper kernels: an sm_90 GPU for which this build loaded sm_90a code.
// False with no GPU, on any other GPU, and in a build without CUDA kernels. Never touches a stream.
inline bool sm90_available() {
#if DITQ_WITH_CUDA
  return ditq::gemm_sm90_available();
#else
  return false;
#endif
}

inline int64_t pick(int64_t arch, int64_t m, bool w4) {
  return ditq::gemm::pick_tile(static_cast<int>(arch), clamp_m(m), w4);
}

// The automatic split count of an mma.sync launch of `tile` (configs/gemm_tiles.h id) on `sm_count` SMs, as the
// launch computes it (auto_splits), for benchmarks/tune_tiles.py and tests: at most `max_splits` (>= 1), or with
// max_splits < 0 the cap of the rule of `arch` and M (max_splits(arch, M): what a launch with an int8 a does).
inline int64_t auto_splits_op(int64_t tile, int64_t group_size, int64_t m, int64_t n, int64_t k, int64_t sm_count,
                              int64_t arch, int64_t max_splits) {
  TORCH_CHECK_VALUE(tile >= 0 && tile < ditq::gemm::tile_count(), "gemm_auto_splits: no mma.sync GEMM tile ", tile,
                    " (ids 0..", ditq::gemm::tile_count() - 1, ")");
  TORCH_CHECK_VALUE(m >= 1 && m < (int64_t{1} << 30) && n >= 1 && n < (int64_t{1} << 26) && k >= 1 &&
                    k <= ditq::gemm::kMaxK && sm_count >= 1 && sm_count <= 1024 && group_size >= 0,
                    "gemm_auto_splits: M in [1, 2^30), N in [1, 2^26), K in [1, ", ditq::gemm::kMaxK,
                    "], sm_count in [1, 1024], group_size >= 0");
  TORCH_CHECK_VALUE(max_splits != 0 && max_splits <= 1024, "gemm_auto_splits: max_splits must be in [1, 1024] ",
                    "(or < 0: the rule's cap), got ", max_splits);
  const int cap = max_splits < 0 ? ditq::gemm::max_splits(static_cast<int>(arch), clamp_m(m))
                                 : static_cast<int>(max_splits);
  return ditq::gemm::auto_splits(static_cast<int>(tile), static_cast<int>(group_size), static_cast<int>(m),
                                 static_cast<int>(n), static_cast<int>(k), static_cast<int>(sm_count), cap);
}

}  // namespace ditq::gemm_binding

// ditq_C::gemm_* and gemm_*_fused take the ditq op's arguments (minus the backend) plus the tile and the
// split-K count (-1 = automatic: the table's tile, splits to fill the GPU, at most the rule's max_splits):
// CPU tensors run the emulated kernels, CUDA tensors the real ones.
TORCH_LIBRARY_FRAGMENT(ditq_C, m) {
  m.def("gemm_w8a8(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype, "
        "int tile=-1, int splits=-1) -> Tensor");
  m.def("gemm_w4a8(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, int group_size, "
        "ScalarType out_dtype, int tile=-1, int splits=-1) -> Tensor");
  m.def("gemm_w8a8_fused(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, bool gelu, "
        "Tensor? gate, Tensor? residual, int rows_per_gate, Tensor? out_scale, ScalarType out_dtype, "
        "int tile=-1, int splits=-1) -> Tensor");
  m.def("gemm_w4a8_fused(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, int group_size, "
        "bool gelu, Tensor? gate, Tensor? residual, int rows_per_gate, Tensor? out_scale, ScalarType out_dtype, "
        "int tile=-1, int splits=-1) -> Tensor");
  m.def("gemm_w4a8i(Tensor a, Tensor a_scale, Tensor w, Tensor w_qscale, Tensor w_scale, Tensor? bias, "
        "int group_size, ScalarType out_dtype, int tile=-1, int splits=-1) -> Tensor");
  m.def("gemm_w4a8i_fused(Tensor a, Tensor a_scale, Tensor w, Tensor w_qscale, Tensor w_scale, Tensor? bias, "
        "int group_size, bool gelu, Tensor? gate, Tensor? residual, int rows_per_gate, Tensor? out_scale, "
        "ScalarType out_dtype, int tile=-1, int splits=-1) -> Tensor");
  m.def("gemm_tile_count() -> int", []() -> int64_t { return ditq::gemm::tile_count(); });
  m.def("gemm_tile_info(int tile) -> int[]", &ditq::gemm_binding::tile_info);
  m.def("gemm_pick_tile(int arch, int m, bool w4) -> int", &ditq::gemm_binding::pick);
  m.def("gemm_max_splits(int arch, int m) -> int", [](int64_t arch, int64_t m) -> int64_t {
    return ditq::gemm::max_splits(static_cast<int>(arch), ditq::gemm_binding::clamp_m(m));
  });
  m.def("gemm_auto_splits(int tile, int group_size, int m, int n, int k, int sm_count, int arch, "
        "int max_splits=-1) -> int", &ditq::gemm_binding::auto_splits_op);
  m.def("gemm_sm90_tile_info(int tile, bool w4) -> int[]", &ditq::gemm_binding::sm90_tile_info);
  m.def("gemm_sm90_schedule(int tiles, int units, int sm_count, int m=-1, int splits=-1) -> int[]",
        &ditq::gemm_binding::sm90_schedule);
  m.def("gemm_sm90_max_splits(int m) -> int", [](int64_t m) -> int64_t {
    return ditq::gemm::sm90_max_splits(ditq::gemm_binding::clamp_m(m));
  });
  m.def("gemm_sm90_available() -> bool", &ditq::gemm_binding::sm90_available);
  m.def("emulator_set_sm_count(int n) -> ()", &ditq::gemm_binding::set_emulated_sm_count);
  m.def("emulator_get_sm_count() -> int", []() -> int64_t { return ditq::gemm_binding::emulated_sm_count(); });
}

TORCH_LIBRARY_IMPL(ditq_C, CPU, m) {
  m.impl("gemm_w8a8", &ditq::gemm_binding::gemm_w8a8_op<true>);
  m.impl("gemm_w4a8", &ditq::gemm_binding::gemm_w4a8_op<true>);
  m.impl("gemm_w8a8_fused", &ditq::gemm_binding::gemm_w8a8_fused_op<true>);
  m.impl("gemm_w4a8_fused", &ditq::gemm_binding::gemm_w4a8_fused_op<true>);
  m.impl("gemm_w4a8i", &ditq::gemm_binding::gemm_w4a8i_op<true>);
  m.impl("gemm_w4a8i_fused", &ditq::gemm_binding::gemm_w4a8i_fused_op<true>);
}

#if DITQ_WITH_CUDA
TORCH_LIBRARY_IMPL(ditq_C, CUDA, m) {
  m.impl("gemm_w8a8", &ditq::gemm_binding::gemm_w8a8_op<false>);
  m.impl("gemm_w4a8", &ditq::gemm_binding::gemm_w4a8_op<false>);
  m.impl("gemm_w8a8_fused", &ditq::gemm_binding::gemm_w8a8_fused_op<false>);
  m.impl("gemm_w4a8_fused", &ditq::gemm_binding::gemm_w4a8_fused_op<false>);
  m.impl("gemm_w4a8i", &ditq::gemm_binding::gemm_w4a8i_op<false>);
  m.impl("gemm_w4a8i_fused", &ditq::gemm_binding::gemm_w4a8i_fused_op<false>);
}
#endif
