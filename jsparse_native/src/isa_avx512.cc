// AVX-512 (F/BW/VL/DQ) kernels: 16-float vectors, 32 registers: an 8 x 3 register
// tile (24 accumulators).
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#include <immintrin.h>
#define JS_AVX512 1
#define JS_NS avx512
#define JS_NAME "avx512"
#define JS_TABLE avx512_kernels
#define JS_W 16
#define JS_MR 8
#define JS_NV 3
#define JS_SR 4
#define JS_SC 4
#include "kernels.inc"
#else
namespace jsparse_native {
const KernelTable* avx512_kernels() { return nullptr; }
}  // namespace jsparse_native
#endif
