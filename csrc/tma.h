// Host-side TMA tensor-map builder: make_tma_map_2d describes a 2-D int8/uint8 tensor (rows of `inner_elems`
// bytes, `outer_elems` rows, `outer_stride_bytes` apart) and the box a kernel's ptx::tma_load_2d copies.
//   * nvcc builds (csrc/*.cu): the real CUtensorMap, encoded by the driver's cuTensorMapEncodeTiled, reached
//     through cudaGetDriverEntryPointByVersion so that nothing links libcuda directly.
//   * the emulator (g++): the emulator's decoded map (emu::TmaMap), which emu::tma_load_2d executes.
// Both check the driver's documented requirements first and return false with a message (never throw): the
// launcher turns it into a ValueError-like error the same way on every backend.
#pragma once

#include <cstdint>
#include <string>

#include "ptx.cuh"

#if !DITQ_EMULATED
#include <cuda.h>
#include <cuda_runtime.h>
#endif

namespace ditq::ptx {

// Bytes of one swizzle span (the longest box row the swizzle allows); 0 for no swizzle.
inline uint32_t tma_swizzle_bytes(TmaSwizzle s) {
  return s == TmaSwizzle::B128 ? 128 : s == TmaSwizzle::B64 ? 64 : s == TmaSwizzle::B32 ? 32 : 0;
}

// The checks cuTensorMapEncodeTiled documents for this use (rank 2, 1-byte elements, no interleave, element
// strides 1), plus the emulator's restriction that a swizzled box row fills the whole span.
inline bool check_tma_map_2d(const void* base, uint64_t inner_elems, uint64_t outer_elems,
                             uint64_t outer_stride_bytes, uint32_t box_inner, uint32_t box_outer, TmaSwizzle swizzle,
                             std::string* error) {
  auto bad = [&](const std::string& why) {
    if (error) *error = "TMA map: " + why;
    return false;
  };
  if (base == nullptr) return bad("null global address");
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return bad("the global address must be 16-byte aligned");
  if (inner_elems == 0 || outer_elems == 0 || inner_elems > (uint64_t{1} << 32) || outer_elems > (uint64_t{1} << 32))
    return bad("tensor sizes must be in 1..2^32, got " + std::to_string(inner_elems) + " x " +
               std::to_string(outer_elems));
  if (outer_stride_bytes % 16 != 0 || outer_stride_bytes >= (uint64_t{1} << 40))
    return bad("the row stride must be a multiple of 16 below 2^40 bytes, got " + std::to_string(outer_stride_bytes));
  if (outer_elems > 1 && outer_stride_bytes < inner_elems)
    return bad("the row stride (" + std::to_string(outer_stride_bytes) + " bytes) is shorter than a row (" +
               std::to_string(inner_elems) + " bytes)");
  if (box_inner == 0 || box_outer == 0 || box_inner > 256 || box_outer > 256)
    return bad("box sizes must be in 1..256, got " + std::to_string(box_inner) + " x " + std::to_string(box_outer));
  if (box_inner % 16 != 0) return bad("the box row must be a multiple of 16 bytes, got " + std::to_string(box_inner));
  const uint32_t span = tma_swizzle_bytes(swizzle);
  if (span != 0 && box_inner > span)
    return bad("a " + std::to_string(span) + "-byte swizzle needs box rows of at most " + std::to_string(span) +
               " bytes, got " + std::to_string(box_inner));
#if DITQ_EMULATED
  if (span != 0 && box_inner != span)
    return bad("the emulator models swizzled boxes whose rows fill the " + std::to_string(span) +
               "-byte span only, got " + std::to_string(box_inner) + "-byte rows");
#endif
  return true;
}

inline bool make_tma_map_2d(TmaMap* out, const void* base, uint64_t inner_elems, uint64_t outer_elems,
                            uint64_t outer_stride_bytes, uint32_t box_inner, uint32_t box_outer, TmaSwizzle swizzle,
                            std::string* error) {
  if (out == nullptr || reinterpret_cast<uintptr_t>(out) % 64 != 0) {
    if (error) *error = "TMA map: the map must be 64-byte aligned";
    return false;
  }
  if (!check_tma_map_2d(base, inner_elems, outer_elems, outer_stride_bytes, box_inner, box_outer, swizzle, error))
    return false;
#if DITQ_EMULATED
  *out = ::ditq::emu::TmaMap{};
  out->magic = ::ditq::emu::kTmaMagic;
  out->base = static_cast<const uint8_t*>(base);
  out->inner = inner_elems;
  out->outer = outer_elems;
  out->stride = outer_stride_bytes;
  out->box_inner = box_inner;
  out->box_outer = box_outer;
  out->swizzle = static_cast<int>(swizzle);
  return true;
#else
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q;
    // 12000: the ABI of cuTensorMapEncodeTiled as introduced in CUDA 12.0 (unchanged since).
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<Encode>(fn);
  }();
  if (encode == nullptr) {
    if (error) *error = "TMA map: the driver has no cuTensorMapEncodeTiled (needs CUDA 12 and an sm_90 GPU)";
    return false;
  }
  const cuuint64_t dims[2] = {inner_elems, outer_elems};
  const cuuint64_t strides[1] = {outer_stride_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUtensorMapSwizzle swz = swizzle == TmaSwizzle::B128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                 : swizzle == TmaSwizzle::B64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                 : swizzle == TmaSwizzle::B32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                              : CU_TENSOR_MAP_SWIZZLE_NONE;
  const CUresult r = encode(out, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swz, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    if (error) *error = "TMA map: cuTensorMapEncodeTiled failed with CUresult " + std::to_string(static_cast<int>(r));
    return false;
  }
  return true;
#endif
}

}  // namespace ditq::ptx
