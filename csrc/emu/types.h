// CUDA's built-in vector types and dim3 for the host build (the emulator), laid out and aligned as in
// vector_types.h so that a kernel's reinterpret_casts mean the same on both sides. Host-only.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#error "csrc/emu/ is the host emulation of CUDA; nvcc builds use the real built-ins"
#endif

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Same sizes and alignments as CUDA's: a 16-byte type is 16-byte aligned, so `*(const int4*)p` on a
// misaligned p is as wrong here as on the GPU (ditq::ptx::ld_global_16 checks it).
#define DITQ_EMU_VEC2(T, N, A) \
  struct alignas(A) N##2 { T x, y; };
#define DITQ_EMU_VEC4(T, N, A) \
  struct alignas(A) N##4 { T x, y, z, w; };
DITQ_EMU_VEC2(signed char, char, 2)
DITQ_EMU_VEC4(signed char, char, 4)
DITQ_EMU_VEC2(unsigned char, uchar, 2)
DITQ_EMU_VEC4(unsigned char, uchar, 4)
DITQ_EMU_VEC2(short, short, 4)
DITQ_EMU_VEC4(short, short, 8)
DITQ_EMU_VEC2(unsigned short, ushort, 4)
DITQ_EMU_VEC4(unsigned short, ushort, 8)
DITQ_EMU_VEC2(int, int, 8)
DITQ_EMU_VEC4(int, int, 16)
DITQ_EMU_VEC2(unsigned, uint, 8)
DITQ_EMU_VEC4(unsigned, uint, 16)
DITQ_EMU_VEC2(float, float, 8)
DITQ_EMU_VEC4(float, float, 16)
#undef DITQ_EMU_VEC2
#undef DITQ_EMU_VEC4

inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline char4 make_char4(signed char x, signed char y, signed char z, signed char w) { return {x, y, z, w}; }

constexpr int warpSize = 32;
