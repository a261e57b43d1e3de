// The per-ISA kernel table shared by the FFI handlers (ffi.cc) and the kernel
// translation units (isa_*.cc). Standard headers only: every ISA-specific function
// lives in its own namespace inside its own translation unit.
#ifndef JSPARSE_NATIVE_KERNELS_H_
#define JSPARSE_NATIVE_KERNELS_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace jsparse_native {

// Element types of values / dense operands.
enum class Elem : int { kF32 = 0, kBF16 = 1 };

// op(A) @ X for block-sparse A, one range of output block-rows at a time.
//
// Output block-row o (``bo`` rows of Y) is the sum over the list positions
// p in [ptr[o], ptr[o+1]) of D_b @ X[src_b * bi : (src_b + 1) * bi, :], where
// b = order ? order[p] : p, src_b = src[b] and D_b (bo x bi) has element (i, k) at
// data[b * bm * bn + i * si + k * sk]. Forward: bo = bm, bi = bn, si = bn, sk = 1;
// transposed (CSC walk): bo = bn, bi = bm, si = 1, sk = bn.
struct SpmmArgs {
  const void* data;
  const int32_t* ptr;
  const int32_t* order;  // nullptr: identity
  const int32_t* src;
  const void* x;
  void* y;
  int64_t bm, bn, bo, bi, si, sk;
  int64_t n;  // columns of X and Y
  Elem dtype;
};

// Blocks [b0, b1) of U[r*bm:(r+1)*bm] @ V[c*bn:(c+1)*bn].T with r = rows[b],
// c = cols[b]; U (M x J), V (K x J) row-major; out (nse, bm, bn).
struct SddmmArgs {
  const void* u;
  const void* v;
  const int32_t* rows;
  const int32_t* cols;
  void* out;
  int64_t bm, bn, j;
  Elem dtype;
};

// N:M products. ``values`` (r x s) with its packed positions (``bits`` per position,
// ``pbytes`` bytes per row of the values). The dense matrix keeps nn of every mm
// entries along one axis; ``transposed_values``: the groups run down the values'
// columns (the stored entries of an output row are a column of the values).
//   nm_rows (gather):  Y[o, :] = sum_t value(o, t) X[(t / nn) * mm + pos(o, t), :]
//   nm_cols (scatter): Y[g * mm + pos, :] += value * X[q, :] over the groups g of a range
// ``ncols``: the width N of X and Y.
struct NmArgs {
  const void* values;
  const uint8_t* pos;
  const void* x;
  void* y;
  int64_t r, s, nn, mm, bits, pbytes;
  int64_t ncols;
  bool transposed_values;
  Elem dtype;
};

struct KernelTable {
  const char* name;
  void (*spmm)(const SpmmArgs&, int64_t o0, int64_t o1);
  void (*sddmm)(const SddmmArgs&, int64_t b0, int64_t b1);
  void (*nm_rows)(const NmArgs&, int64_t r0, int64_t r1);   // W @ X, rows of W
  void (*nm_cols)(const NmArgs&, int64_t g0, int64_t g1);   // W.T @ X, groups of W's columns
};

const KernelTable* generic_kernels();
const KernelTable* avx2_kernels();    // nullptr when not built for x86-64
const KernelTable* avx512_kernels();  // nullptr when not built for x86-64

}  // namespace jsparse_native

#endif  // JSPARSE_NATIVE_KERNELS_H_
