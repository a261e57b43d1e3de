// The per-ISA kernel table shared by the FFI handlers (ffi.cc) and the kernel
// translation units (isa_*.cc). Standard headers only: every ISA-specific function
// lives in its own namespace inside its own translation unit.
#ifndef JSPARSE_NATIVE_KERNELS_H_
#define JSPARSE_NATIVE_KERNELS_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>

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
  int strips = 1;  // the strip kernel (bcsr_strips.inc) where it applies; 0: general only
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
// ``pbytes`` bytes per row of the values). The dense matrix W keeps nn of every mm
// entries along one axis; ``transposed_values`` (axis 0): the groups run down the
// values' columns. ``transpose``: the product is W.T @ X, else W @ X. ``ncols``: the
// width of X and Y.
//
// The kernels never trust a position: a field >= mm, or positions not strictly
// increasing within a group, set ``*bad`` (the handler then returns an error) and the
// entry is dropped; nothing is addressed through an unchecked position.
//
// ``mask_lut`` (nullptr when the configuration has no fast path): for a packed byte,
// the lanes its entries occupy among the ``lut_lanes`` (8 or 16) dense lanes its whole
// groups cover, bit 31 set when the byte is invalid (a field >= mm or not increasing).
// ``dec_lut``: the byte's fields, one per byte of the word (little-endian).
struct NmArgs {
  const void* values;
  const uint8_t* pos;
  const void* x;
  void* y;
  int64_t r, s, nn, mm, bits, pbytes;
  int64_t ncols;
  bool transposed_values;
  bool transpose;
  Elem dtype;
  const uint32_t* mask_lut;
  int64_t lut_lanes;
  const uint32_t* dec_lut;
  // Widths 2 .. gather_upto: the narrow-X kernels (row-dot, column-axpy, row-gather,
  // dot, gather); from gather_from on: the gather kernel (forced); else expanded tiles.
  int64_t gather_from;
  int64_t gather_upto;
  bool finite_x;        // X holds no NaN or infinity (else: stored entries only)
  int* bad;
  // W.T @ X along axis 0 from this width on: the permute kernel (AVX-512; kernels.inc).
  int64_t permute_from;
  // W @ X along axis 1 from this width on: the row-gather kernel (nm_rowgather.inc).
  int64_t rowgather_from;
  // W @ X along axis 0 from this width on: the pattern-bucket kernel (AVX-512, 2:4;
  // nm_bucket.inc).
  int64_t bucket_from;
  int* ran;  // kRan* bits: the kernels some range ran (tests)
};
constexpr int kRanPermute = 1, kRanRowGather = 2, kRanBucket = 4, kRanGroupDot = 8,
              kRanRowPerm = 16;

// Output rows per work item (the unit of the thread split) of an N:M product: 16, or
// the smallest multiple of mm >= 64 when the output rows run along the groups (a
// longer run of each row of W per expansion).
inline int64_t nm_panel_rows(int64_t mm, bool grouped_out) {
  return grouped_out ? mm * ((64 + mm - 1) / mm) : 16;
}

// The N:M SDDMM (nm_sddmm.inc): the values' gradient of an N:M product.
// out = (U @ V.T) at the stored positions of an N:M pattern, shaped like its values
// (vr x vc), with the positions packed as for the N:M product (``bits`` per position,
// ``pbytes`` bytes per row of the values). U (rows x k), V (cols x k), row-major.
//
// The kernels see the problem as "other" x "grouped": the grouped operand G holds the
// dense rows the positions select (axis 1: V, axis 0: U), the other operand O the rows
// each stored entry pairs with (axis 1: U, a row of the values; axis 0: V, a column).
// Entry t of O's row a (t along the groups, t / nn its group) is the dot over k of
// O[a] and G[(t / nn) * mm + position]. A work item is kNmSddmmRows rows of O.
struct NmSddmmArgs {
  const void* u;
  const void* v;
  const uint8_t* pos;
  void* out;
  int64_t vr, vc;  // the values' shape
  int64_t nn, mm, bits, pbytes, k;
  bool axis0;
  Elem dtype;
  int64_t kc;      // contraction chunk (elements; 0: the default)
  int64_t gblock;  // G rows per block (0: the default)
  int* bad;        // set when a position is corrupted (>= mm, or not increasing)
};

constexpr int64_t kNmSddmmRows = 128;

// N:M pruning (nm_prune.inc): keep the nn entries of largest magnitude in every group of
// mm (mm <= 16) along one axis of the dense X (rows x cols, row-major). Writes the
// values (axis 0: rows / mm * nn x cols; axis 1: rows x cols / mm * nn), their packed
// positions (``bits`` per position, ``pbytes`` bytes per row of the values, padding
// bits 0) and, unless ``keep`` is nullptr, the dense keep mask (rows x cols, 0 / 1).
// A work item is one block of mm rows (axis 0) or one row (axis 1).
constexpr int64_t kPruneMaxM = 16;
struct NmPruneArgs {
  const void* x;
  void* values;
  uint8_t* pos;
  uint8_t* keep;
  int64_t rows, cols, nn, mm, bits, pbytes;
  bool axis0;
  Elem dtype;
};

struct KernelTable {
  const char* name;
  void (*spmm)(const SpmmArgs&, int64_t o0, int64_t o1);
  void (*sddmm)(const SddmmArgs&, int64_t b0, int64_t b1);
  // op(W) @ X for the work items [i0, i1): output rows [i0 * P, min(i1 * P, rows))
  // with P = nm_panel_rows(...).
  void (*nm)(const NmArgs&, int64_t i0, int64_t i1);
  // The N:M SDDMM for the work items [i0, i1) (kNmSddmmRows rows of O each).
  void (*nm_sddmm)(const NmSddmmArgs&, int64_t i0, int64_t i1);
  // N:M pruning for the work items [i0, i1).
  void (*nm_prune)(const NmPruneArgs&, int64_t i0, int64_t i1);
};

const KernelTable* generic_kernels();
const KernelTable* avx2_kernels();    // nullptr when not built for x86-64
const KernelTable* avx512_kernels();  // nullptr when not built for x86-64

}  // namespace jsparse_native

#endif  // JSPARSE_NATIVE_KERNELS_H_
