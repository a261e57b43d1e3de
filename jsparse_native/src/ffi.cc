// XLA FFI handlers of jsparse's native CPU kernels: argument checks (shapes, dtypes
// and every index the kernels will read), the ISA choice, and the split of the work
// over XLA's intra-op thread pool.
//
// Handlers (registered from Python with jax.ffi.register_ffi_target, platform "cpu"):
//   jsparse_bcsr_spmm   (data, ptr, order, src, check, x) -> y   op(A) @ X
//   jsparse_bcsr_sddmm  (u, v, rows, cols) -> out                blocks of U @ V.T
//   jsparse_nm_spmm     (values, packed positions, x) -> y        op(W) @ X for N:M W
//   jsparse_nm_sddmm    (u, v, packed positions) -> values        (U @ V.T)[kept], N:M
//   jsparse_nm_prune    (x) -> (values, packed positions, keep)   N:M of largest magnitude
// plus a few C functions (ctypes) to query and force the ISA and the thread count.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <sys/mman.h>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse_native {
namespace {

// ------------------------------------------------------------------ ISA choice
// 0 = generic, 1 = avx2, 2 = avx512.
int detect_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      avx512_kernels() != nullptr)
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      avx2_kernels() != nullptr)
    return 1;
#endif
  return 0;
}

const int kBestIsa = detect_isa();

int isa_from_env() {
  const char* env = std::getenv("JSPARSE_NATIVE_ISA");
  if (env == nullptr || *env == '\0') return kBestIsa;
  std::string s(env);
  int want = s == "generic" ? 0 : s == "avx2" ? 1 : s == "avx512" ? 2 : kBestIsa;
  return std::min(want, kBestIsa);
}

std::atomic<int> g_isa{isa_from_env()};
std::atomic<int> g_max_threads{0};   // 0: every thread of XLA's pool
std::atomic<int> g_last_threads{0};  // threads the last call used (for tests)
std::atomic<int> g_bcsr_strips{1};   // BCSR strip kernel (bcsr_strips.inc); 0: general only
std::atomic<int> g_huge_pages{1};    // large outputs advised onto huge pages; 0: never
constexpr int64_t kNever = int64_t{1} << 30;  // a width of X no call reaches
// N:M products contracting the groups: the stored-entries gather kernel from this
// width of X on (forced: tests, benchmarks; by default only when X holds a NaN or an
// infinity, as the expanded tiles win for wide X).
std::atomic<int64_t> g_nm_gather_from{kNever};
// The narrow-X kernels (row-dot, column-axpy, row-gather, dot, gather: docs/native.md)
// from 2 columns up to this width (one column runs the matrix-vector loops; each kernel takes
// the widths where it was measured fastest, kernels.inc nm_case). -1: the measured
// default per instruction set (kGatherUpto).
std::atomic<int64_t> g_nm_gather_upto{-1};
// Measured (docs/native.md, "Speed"), 2:4, 4096 x 4096, one thread: AVX-512 gather /
// expanded tiles 5.0 / 7.9 ms at 16 columns, 8.8 / 11.9 at 48, 15.4 / 16.8 at 64,
// 20.1 / 22.0 at 96; AVX2 9.1 / 44.9 at 16, 16.3 / 54.7 at 48; portable 19.3 / 48.8 at
// 16, 39.6 / 79.6 at 48 (the dot kernel, where it takes a width, beat both).
constexpr int64_t kGatherUpto[3] = {64, 64, 64};  // generic, avx2, avx512
// W.T @ X along axis 0 (NMLinear's forward): the permute kernel from this width of X on
// (AVX-512 only). -1: the measured default, kPermuteFrom on AMD CPUs (Zen 4, whose
// 512-bit permutes largely overlap the FMAs; docs/native.md), never elsewhere (on the Intel
// runner they share an FMA port, and the kernel was not measured there).
std::atomic<int64_t> g_nm_permute_from{-1};
constexpr int64_t kPermuteFrom = 2;
// W @ X along axis 1 (the contraction along the groups): the row-gather kernel from this
// width of X (forced, any instruction set and width; tests, benchmarks). -1: the
// measured default, from kRowGatherFrom columns at every width (past four vectors in
// passes of four) with AVX2 or AVX-512, never on the portable path (not measured there).
std::atomic<int64_t> g_nm_rowgather_from{-1};
constexpr int64_t kRowGatherFrom = 5;
// W @ X along axis 0 (across the groups), 2:4: the pattern-bucket kernel (AVX-512 with
// VBMI and VBMI2) from this width (forced; tests, benchmarks). -1: the measured default,
// kBucketFrom.
std::atomic<int64_t> g_nm_bucket_from{-1};
// Paired on the Zen 4 runner (2:4, 4096^2, two threads; against the group-dot kernel
// with its 2:4 rows from mask registers, group_rows24): 5 and 6 columns 0.87-0.88x as
// fast, 7 0.97-0.98x, 8 1.06-1.12x; against the group-dot kernel with its addresses
// kept out of the loop and its prefetch running on into the next group, 8 columns
// 0.97-0.99x dense against 1.05-1.09x (alternating the two, five rounds), so 8 columns
// run the group-dot kernel too (its widest).
constexpr int64_t kBucketFrom = 9;
std::atomic<int> g_nm_last_ran{0};  // kRan* bits of the last N:M product (tests)

bool permutes_overlap_fmas() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}
const bool kPermutesOverlapFmas = permutes_overlap_fmas();

const KernelTable* table_for(int isa) {
  if (isa >= 2 && avx512_kernels()) return avx512_kernels();
  if (isa >= 1 && avx2_kernels()) return avx2_kernels();
  return generic_kernels();
}

// ------------------------------------------------------------------ threads
// ``chunks`` work items run by the calling thread and up to ``threads - 1`` tasks on
// XLA's pool. The caller never waits for a task that has not started: it takes items
// itself until none is left, then waits only for the items other threads claimed.
// A task that starts late (after the call returned) finds nothing to do; the state it
// touches is shared-owned, so it outlives the call.
struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::mutex mu;
  std::condition_variable cv;
};

template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t chunks, const F& body) {
  int64_t threads = pool.num_threads();
  const int cap = g_max_threads.load();
  if (cap > 0) threads = std::min<int64_t>(threads, cap);
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, chunks));
  g_last_threads.store(static_cast<int>(threads));
  if (threads <= 1) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  auto state = std::make_shared<ParallelState>();
  state->total = chunks;
  // The body is only called for claimed items, which all finish before we return.
  const F* fn = &body;
  auto work = [state, fn]() {
    for (;;) {
      const int64_t c = state->next.fetch_add(1);
      if (c >= state->total) return;
      (*fn)(c);
      if (state->done.fetch_add(1) + 1 == state->total) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->total; });
}

// Cut [0, n) into about ``parts`` ranges of equal cost, cost(i) = cum[i] - cum[0]
// (a non-decreasing prefix), each range non-empty.
std::vector<int64_t> balanced_cuts(int64_t n, int64_t parts,
                                   const std::vector<int64_t>& cum) {
  std::vector<int64_t> cuts{0};
  if (n == 0) return cuts;
  const int64_t total = cum[n] - cum[0];
  parts = std::max<int64_t>(1, std::min(parts, n));
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = cum[0] + (total * p) / parts;
    int64_t i = std::lower_bound(cum.begin(), cum.begin() + n + 1, target) - cum.begin();
    i = std::min<int64_t>(std::max<int64_t>(i, cuts.back() + 1), n);
    if (i < n) cuts.push_back(i);
  }
  cuts.push_back(n);
  return cuts;
}

// ------------------------------------------------------------------ helpers
ffi::Error elem_of(ffi::DataType t, Elem* out, const char* what) {
  if (t == ffi::DataType::F32) {
    *out = Elem::kF32;
  } else if (t == ffi::DataType::BF16) {
    *out = Elem::kBF16;
  } else {
    return ffi::Error::InvalidArgument(std::string("jsparse native: ") + what +
                                       " must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

// Outputs of 32 MiB and more come to a call as freshly mapped memory every time (glibc
// maps requests that large and unmaps them when XLA frees the buffer), so the kernel's
// first write to each 4 KiB page faults: 8192 faults for the 32 MiB gradient of a 2:4
// 4096 x 4096 matrix, 7 ms of a 16 ms gradient on the Zen 4 runner (docs/native.md,
// *Huge pages for the outputs*). Advising the whole 2 MiB pages inside the output with
// MADV_HUGEPAGE before the kernel writes lets the faults map 2 MiB at a time where
// transparent huge pages are "madvise" (the default of several distributions) or
// "always"; with them off it changes nothing. Only whole pages inside the buffer are
// advised, and only for outputs of at least kHugeMin of them.
constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
constexpr uintptr_t kHugeMin = 4;
void advise_huge_pages(void* out, size_t bytes) {
#ifdef MADV_HUGEPAGE
  if (!g_huge_pages.load(std::memory_order_relaxed) || bytes < kHugeMin * kHugePage) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(out);
  const uintptr_t lo = (p + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t hi = (p + bytes) & ~(kHugePage - 1);
  // A hint: where it fails (a kernel without transparent huge pages) nothing changes.
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)out;
  (void)bytes;
#endif
}

ffi::Error bad(const std::string& msg) {
  return ffi::Error::InvalidArgument("jsparse native: " + msg);
}

int64_t pool_parts(ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads()) * 4;
}

// ------------------------------------------------------------------ BCSR product
// data (nse, bm, bn); ptr (nout + 1,); order (nse,) or (0,) for the identity;
// src (nse,): the input block of each stored block; check (nse,) or (0,): when given,
// check[order[p]] must equal the output block-row of p (the CSC view agrees with the
// CSR indices); x (nin * bi, N) -> y (nout * bo, N). ``transpose`` picks the roles.
ffi::Error BcsrSpmm(ffi::ThreadPool pool, ffi::AnyBuffer data, ffi::Buffer<ffi::S32> ptr,
                    ffi::Buffer<ffi::S32> order, ffi::Buffer<ffi::S32> src,
                    ffi::Buffer<ffi::S32> check, ffi::AnyBuffer x,
                    ffi::Result<ffi::AnyBuffer> y, bool transpose) {
  Elem dtype;
  if (auto e = elem_of(data.element_type(), &dtype, "values"); e.failure()) return e;
  if (x.element_type() != data.element_type() || y->element_type() != data.element_type())
    return bad("values, x and the output must share one dtype");
  auto dd = data.dimensions();
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (dd.size() != 3 || xd.size() != 2 || yd.size() != 2) return bad("bad operand ranks");
  const int64_t nse = dd[0], bm = dd[1], bn = dd[2], n = xd[1];
  const int64_t bo = transpose ? bn : bm, bi = transpose ? bm : bn;
  if (bm <= 0 || bn <= 0) return bad("empty block shape");
  if (yd[1] != n) return bad("x and the output differ in width");
  if (yd[0] % bo != 0 || xd[0] % bi != 0) return bad("rows not a multiple of the block");
  const int64_t nout = yd[0] / bo, nin = xd[0] / bi;
  if (static_cast<int64_t>(ptr.element_count()) != nout + 1)
    return bad("the block pointer has " + std::to_string(ptr.element_count()) +
               " entries, expected " + std::to_string(nout + 1));
  const bool has_order = order.element_count() != 0;
  const bool has_check = check.element_count() != 0;
  if ((has_order && static_cast<int64_t>(order.element_count()) != nse) ||
      static_cast<int64_t>(src.element_count()) != nse ||
      (has_check && static_cast<int64_t>(check.element_count()) != nse))
    return bad("index arrays must have one entry per stored block");
  const int32_t* P = ptr.typed_data();
  const int32_t* O = has_order ? order.typed_data() : nullptr;
  const int32_t* S = src.typed_data();
  const int32_t* C = has_check ? check.typed_data() : nullptr;
  // Every index the kernel reads, checked before any is used.
  for (int64_t o = 0; o < nout; ++o) {
    if (P[o] < 0 || P[o] > P[o + 1] || P[o + 1] > nse)
      return bad("corrupted block pointer at block-row " + std::to_string(o) + ": " +
                 std::to_string(P[o]) + ", " + std::to_string(P[o + 1]) +
                 " (must be non-decreasing within [0, " + std::to_string(nse) + "])");
  }
  for (int64_t o = 0; o < nout; ++o) {
    for (int64_t p = P[o]; p < P[o + 1]; ++p) {
      const int64_t b = O ? O[p] : p;
      if (b < 0 || b >= nse)
        return bad("corrupted block order: entry " + std::to_string(p) + " is " +
                   std::to_string(b) + ", outside [0, " + std::to_string(nse) + ")");
      if (S[b] < 0 || S[b] >= nin)
        return bad("corrupted block index: stored block " + std::to_string(b) + " has " +
                   std::to_string(S[b]) + ", outside [0, " + std::to_string(nin) + ")");
      if (C && C[b] != o)
        return bad("the transposed view disagrees with the block indices at stored block " +
                   std::to_string(b));
    }
  }
  SpmmArgs args{data.untyped_data(), P, O, S, x.untyped_data(), y->untyped_data(),
                bm, bn, bo, bi, transpose ? 1 : bn, transpose ? bn : 1, n, dtype};
  args.strips = g_bcsr_strips.load();
  if (n == 0 || nout == 0) return ffi::Error::Success();
  advise_huge_pages(y->untyped_data(), y->size_bytes());
  const KernelTable* k = table_for(g_isa.load());
  // Balance by stored blocks (plus one per block-row for its zeroing/stores).
  std::vector<int64_t> cum(nout + 1);
  for (int64_t o = 0; o <= nout; ++o) cum[o] = static_cast<int64_t>(P[o] - P[0]) * 4 + o;
  const std::vector<int64_t> cuts = balanced_cuts(nout, pool_parts(pool), cum);
  parallel_for(pool, static_cast<int64_t>(cuts.size()) - 1,
               [&](int64_t c) { k->spmm(args, cuts[c], cuts[c + 1]); });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ BCSR SDDMM
ffi::Error BcsrSddmm(ffi::ThreadPool pool, ffi::AnyBuffer u, ffi::AnyBuffer v,
                     ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> cols,
                     ffi::Result<ffi::AnyBuffer> out) {
  Elem dtype;
  if (auto e = elem_of(u.element_type(), &dtype, "u"); e.failure()) return e;
  if (v.element_type() != u.element_type() || out->element_type() != u.element_type())
    return bad("u, v and the output must share one dtype");
  auto ud = u.dimensions();
  auto vd = v.dimensions();
  auto od = out->dimensions();
  if (ud.size() != 2 || vd.size() != 2 || od.size() != 3) return bad("bad operand ranks");
  const int64_t nse = od[0], bm = od[1], bn = od[2], j = ud[1];
  if (vd[1] != j) return bad("u and v differ in width");
  if (bm <= 0 || bn <= 0) return bad("empty block shape");
  if (ud[0] % bm != 0 || vd[0] % bn != 0) return bad("rows not a multiple of the block");
  const int64_t nbr = ud[0] / bm, nbc = vd[0] / bn;
  if (static_cast<int64_t>(rows.element_count()) != nse ||
      static_cast<int64_t>(cols.element_count()) != nse)
    return bad("index arrays must have one entry per stored block");
  const int32_t* R = rows.typed_data();
  const int32_t* C = cols.typed_data();
  for (int64_t b = 0; b < nse; ++b) {
    if (R[b] < 0 || R[b] >= nbr || C[b] < 0 || C[b] >= nbc)
      return bad("corrupted block coordinates at stored block " + std::to_string(b) + ": (" +
                 std::to_string(R[b]) + ", " + std::to_string(C[b]) + ") outside the " +
                 std::to_string(nbr) + " x " + std::to_string(nbc) + " block grid");
  }
  if (nse == 0) return ffi::Error::Success();
  SddmmArgs args{u.untyped_data(), v.untyped_data(), R, C, out->untyped_data(),
                 bm, bn, j, dtype};
  const KernelTable* k = table_for(g_isa.load());
  advise_huge_pages(out->untyped_data(), out->size_bytes());
  const int64_t parts = std::min<int64_t>(nse, pool_parts(pool));
  parallel_for(pool, parts, [&](int64_t c) {
    k->sddmm(args, nse * c / parts, nse * (c + 1) / parts);
  });
  return ffi::Error::Success();
}


// ------------------------------------------------------------------ N:M product
// values (vr, vc), packed (vr, pbytes) uint8 -> y. ``axis``: the grouped axis of the
// dense matrix W; ``transpose``: W.T @ X. The dense shape is (vr / n * m, vc) for
// axis 0 and (vr, vc / n * m) for axis 1.
ffi::Error NmSpmm(ffi::ThreadPool pool, ffi::AnyBuffer values, ffi::Buffer<ffi::U8> packed,
                  ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int64_t n, int64_t m,
                  int64_t axis, bool transpose) {
  Elem dtype;
  if (auto e = elem_of(values.element_type(), &dtype, "values"); e.failure()) return e;
  if (x.element_type() != values.element_type() || y->element_type() != values.element_type())
    return bad("values, x and the output must share one dtype");
  auto vd = values.dimensions();
  auto pd = packed.dimensions();
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (vd.size() != 2 || pd.size() != 2 || xd.size() != 2 || yd.size() != 2)
    return bad("bad operand ranks");
  if (n <= 0 || m <= n || m > 256 || (axis != 0 && axis != 1)) return bad("bad n, m or axis");
  const int64_t vr = vd[0], vc = vd[1], ncols = xd[1];
  const int64_t bits = m <= 4 ? 2 : m <= 16 ? 4 : 8, per = 8 / bits;
  const int64_t pbytes = (vc + per - 1) / per;
  if (pd[0] != vr || pd[1] != pbytes) return bad("packed positions of the wrong shape");
  const int64_t grouped_len = axis == 1 ? vc : vr;
  if (grouped_len % n != 0) return bad("values not a whole number of groups");
  const int64_t rows = axis == 1 ? vr : vr / n * m, cols = axis == 1 ? vc / n * m : vc;
  const int64_t in_rows = transpose ? rows : cols, out_rows = transpose ? cols : rows;
  if (xd[0] != in_rows || yd[0] != out_rows || yd[1] != ncols)
    return bad("x or the output has the wrong shape");
  if (ncols == 0 || out_rows == 0) return ffi::Error::Success();
  if (in_rows == 0) {  // an empty contraction: a zero output
    const size_t elem = dtype == Elem::kF32 ? 4 : 2;
    std::memset(y->untyped_data(), 0, static_cast<size_t>(out_rows * ncols) * elem);
    return ffi::Error::Success();
  }
  // The kernels check every position they read (a field >= m, or positions not strictly
  // increasing within a group: a corrupted pattern) and drop it; ``bad`` reports it.
  // Tables of a packed byte: its fields (one per byte) and, when whole groups fit in a
  // byte and cover 8 or 16 dense lanes, the lanes its entries occupy (the AVX-512
  // expand's mask; bit 31: the byte is invalid).
  const uint8_t* P = packed.typed_data();
  const int64_t fmask = (int64_t{1} << bits) - 1;
  const int64_t lanes = per % n == 0 ? per / n * m : 0;
  const bool fast = lanes == 8 || lanes == 16;
  uint32_t dec_lut[256], mask_lut[256];
  for (int b = 0; b < 256; ++b) {
    uint32_t dec = 0, mask = 0;
    bool ok = true;
    int64_t prev = -1;
    for (int64_t f = 0; f < per; ++f) {
      const int64_t field = (b >> (bits * f)) & fmask;
      dec |= static_cast<uint32_t>(field) << (8 * f);
      if (f % n == 0) prev = -1;
      if (field >= m || field <= prev) ok = false;
      prev = field;
      if (fast && field < m) mask |= 1u << ((f / n) * m + field);
    }
    dec_lut[b] = dec;
    mask_lut[b] = mask | (ok ? 0u : 0x80000000u);
  }
  // Expanded tiles multiply unstored zeros too: fine unless X holds a NaN or an
  // infinity (0 * inf = NaN), which only stored entries may meet (one scan of X).
  bool finite_x = true;
  {
    const int64_t count = xd[0] * ncols;
    uint32_t any = 0;
    if (dtype == Elem::kF32) {
      const uint32_t* w = static_cast<const uint32_t*>(x.untyped_data());
      for (int64_t e = 0; e < count; ++e) any |= (w[e] & 0x7f800000u) == 0x7f800000u;
    } else {
      const uint16_t* w = static_cast<const uint16_t*>(x.untyped_data());
      for (int64_t e = 0; e < count; ++e) any |= (w[e] & 0x7f80u) == 0x7f80u;
    }
    finite_x = any == 0;
  }
  int bad_flag = 0;
  NmArgs args{values.untyped_data(), P, x.untyped_data(), y->untyped_data(), vr, vc, n, m,
              bits, pbytes, ncols, axis == 0, transpose, dtype, fast ? mask_lut : nullptr,
              lanes, dec_lut, g_nm_gather_from.load(), 0, finite_x, &bad_flag};
  const int isa = g_isa.load();
  const KernelTable* k = table_for(isa);
  const int64_t upto = g_nm_gather_upto.load();
  args.gather_upto = upto >= 0 ? upto : kGatherUpto[std::max(0, std::min(isa, 2))];
  const int64_t pf = g_nm_permute_from.load();
  args.permute_from = pf >= 0 ? std::max<int64_t>(pf, 1) : kPermutesOverlapFmas ? kPermuteFrom : kNever;
  const int64_t rg = g_nm_rowgather_from.load();
  args.rowgather_from = rg >= 0                  ? std::max<int64_t>(rg, 1)
                        : k != generic_kernels() ? kRowGatherFrom
                                                 : kNever;
  const int64_t pb = g_nm_bucket_from.load();
  args.bucket_from = pb >= 0 ? std::max<int64_t>(pb, 1) : kBucketFrom;
  int ran = 0;
  args.ran = &ran;
  advise_huge_pages(y->untyped_data(), y->size_bytes());
  const bool grouped_out = (axis == 1) == transpose;
  const int64_t panel = nm_panel_rows(m, grouped_out);
  const int64_t items = (out_rows + panel - 1) / panel;
  // Uniform work: one range per thread (longer runs of W's rows in each).
  const int64_t parts = std::min<int64_t>(items, std::max<int64_t>(1, pool.num_threads()));
  parallel_for(pool, parts, [&](int64_t c) {
    k->nm(args, items * c / parts, items * (c + 1) / parts);
  });
  g_nm_last_ran.store(__atomic_load_n(&ran, __ATOMIC_RELAXED));
  if (__atomic_load_n(&bad_flag, __ATOMIC_RELAXED))
    return bad("corrupted N:M positions: a position >= m = " + std::to_string(m) +
               " or positions not strictly increasing within a group");
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jsparse_native

// Exported (the library is built with -fvisibility=hidden).
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(jsparse_bcsr_spmm, jsparse_native::BcsrSpmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("transpose"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jsparse_bcsr_sddmm, jsparse_native::BcsrSddmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jsparse_nm_spmm, jsparse_native::NmSpmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("axis")
                                  .Attr<bool>("transpose"));

// ------------------------------------------------------------------ ctypes controls
extern "C" {
// The ISA the kernels use now / the best this CPU runs: 0 generic, 1 avx2, 2 avx512.
int jsparse_native_isa() { return jsparse_native::g_isa.load(); }
int jsparse_native_best_isa() { return jsparse_native::kBestIsa; }
// Force an ISA (clamped to what the CPU runs); returns the one now in use.
int jsparse_native_set_isa(int isa) {
  const int v = std::max(0, std::min(isa, jsparse_native::kBestIsa));
  jsparse_native::g_isa.store(v);
  return v;
}
// Cap the threads a call uses (0: all of XLA's pool).
void jsparse_native_set_max_threads(int n) { jsparse_native::g_max_threads.store(std::max(0, n)); }
int jsparse_native_max_threads() { return jsparse_native::g_max_threads.load(); }
int jsparse_native_last_threads() { return jsparse_native::g_last_threads.load(); }
// BCSR products: the strip kernel where the block shape fits it (1, the default) or the
// general one only (0): tests, benchmarks.
void jsparse_native_set_bcsr_strips(int on) { jsparse_native::g_bcsr_strips.store(std::max(0, on)); }
int jsparse_native_bcsr_strips() { return jsparse_native::g_bcsr_strips.load(); }
// Outputs of 8 MiB and more advised onto huge pages (1, the default) or not (0):
// tests, benchmarks.
void jsparse_native_set_huge_pages(int on) { jsparse_native::g_huge_pages.store(on != 0); }
int jsparse_native_huge_pages() { return jsparse_native::g_huge_pages.load(); }
// N:M: the width of X from which the gather kernel runs (benchmarks, tests).
void jsparse_native_set_nm_gather_from(int n) { jsparse_native::g_nm_gather_from.store(std::max(1, n)); }
int jsparse_native_nm_gather_from() { return static_cast<int>(jsparse_native::g_nm_gather_from.load()); }
// ... and up to this width (0: never; -1: the measured default).
void jsparse_native_set_nm_gather_upto(int n) { jsparse_native::g_nm_gather_upto.store(std::max(-1, n)); }
int jsparse_native_nm_gather_upto() { return static_cast<int>(jsparse_native::g_nm_gather_upto.load()); }
// ... W.T @ X along axis 0: the permute kernel from this width (-1: the default per CPU).
void jsparse_native_set_nm_permute_from(int n) { jsparse_native::g_nm_permute_from.store(std::max(-1, n)); }
int jsparse_native_nm_permute_from() { return static_cast<int>(jsparse_native::g_nm_permute_from.load()); }
// ... W @ X along axis 1: the row-gather kernel from this width (-1: the default).
void jsparse_native_set_nm_rowgather_from(int n) { jsparse_native::g_nm_rowgather_from.store(std::max(-1, n)); }
int jsparse_native_nm_rowgather_from() { return static_cast<int>(jsparse_native::g_nm_rowgather_from.load()); }
// ... W @ X along axis 0, 2:4: the pattern-bucket kernel from this width (-1: default).
void jsparse_native_set_nm_bucket_from(int n) { jsparse_native::g_nm_bucket_from.store(std::max(-1, n)); }
int jsparse_native_nm_bucket_from() { return static_cast<int>(jsparse_native::g_nm_bucket_from.load()); }
// The kRan* bits (kernels.h) of the kernels the last N:M product ran (tests).
int jsparse_native_nm_last_ran() { return jsparse_native::g_nm_last_ran.load(); }
}
#pragma GCC visibility pop

// The N:M SDDMM's and pruning's handlers (their own files).
#include "nm_sddmm_ffi.inc"
#include "nm_prune_ffi.inc"
