// The N:M SDDMM (the values' gradient of an N:M product): declarations shared by its
// kernels (nm_sddmm.inc, compiled once per ISA inside kernels.inc) and its FFI handler
// (nm_sddmm_ffi.inc, included by ffi.cc).
#ifndef JSPARSE_NATIVE_NM_SDDMM_H_
#define JSPARSE_NATIVE_NM_SDDMM_H_

#include <cstdint>

#include "kernels.h"

namespace jsparse_native {

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

typedef void (*NmSddmmFn)(const NmSddmmArgs&, int64_t i0, int64_t i1);

// One per ISA (defined in nm_sddmm.inc); weak, so that a build without the x86-64
// translation units links (the handler then uses the portable one).
NmSddmmFn nm_sddmm_generic();
NmSddmmFn nm_sddmm_avx2() __attribute__((weak));
NmSddmmFn nm_sddmm_avx512() __attribute__((weak));

}  // namespace jsparse_native

#endif  // JSPARSE_NATIVE_NM_SDDMM_H_
