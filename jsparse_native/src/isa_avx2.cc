// AVX2 + FMA kernels (8-float vectors, 16 registers: a 4 x 3 register tile).
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
// tune=haswell: GCC's generic tuning splits unaligned 256-bit loads and stores in two.
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt,tune=haswell")
#include <immintrin.h>
#define JS_AVX2 1
#define JS_NS avx2
#define JS_NAME "avx2"
#define JS_TABLE avx2_kernels
#define JS_W 8
#define JS_MR 4
#define JS_NV 3
#define JS_SR 2
#define JS_SC 4
#include "kernels.inc"
#else
namespace jsparse_native {
const KernelTable* avx2_kernels() { return nullptr; }
}  // namespace jsparse_native
#endif
