// bfloat16 x bfloat16 -> float32 matrix products for the native engine's logits, on CPUs with
// AVX512-BF16 (vdpbf16ps: 16 float32 lanes, each += a pair of exact bf16 products).
//
// Why not ATen: a bf16 matrix product through ATen either rounds its output to bf16 (oneDNN:
// the logits would carry bf16's 2^-9 relative error, 20 at |z| ~ 1e4) or, for a float32 output,
// goes to MKL's bf16 routine, which on a non-Intel CPU runs no faster than float32 products on
// float32 copies of the operands (measured on the 2-core AMD EPYC: 256 x 512 x 32768 in ~63 ms,
// as float32's 65 ms, against oneDNN's 22 ms with bf16 output). This kernel keeps float32
// accumulation, as the GPU kernels and the torch engine do, at bf16 speed, with no float32 copy
// of a weight.
//
// C[M, cols] = A[M, K] B[cols, K]^T, both operands row-major in K. The product runs over pairs of
// k (vdpbf16ps takes two bf16 per 32-bit lane), so both operands are read as int32 "pairs":
//   A: [M, pairs] int32, a bf16 row-major matrix viewed as int32 (K odd: padded by one zero);
//   B: packed once (pack_panels) into panels of PANEL rows, each panel [pairs][PANEL] int32, so
//      one 64-byte load holds 16 rows' pair p.
// A micro tile is MICRO_ROWS rows of A times one panel: 6 x 4 vectors of accumulators (24 of the
// 32 registers, with 4 for the panel's pair and 1 for A's broadcast pair). K is walked in slices
// of K_SLICE pairs so that a slice of A ([M, K_SLICE], 256 KiB at M = 256) and a panel slice
// (64 KiB) stay in the L2 cache for large hidden sizes.
//
// Rounding: each bf16 x bf16 product is exact in float32 and is added with float32 rounding (as
// a float32 FMA chain over float32 copies of the operands would, in another order); denormal
// inputs are read as zero and denormal results flushed to zero (vdpbf16ps ignores MXCSR), far
// below anything a logit resolves.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define WMSS_HAVE_BF16_GEMM 1
#else
#define WMSS_HAVE_BF16_GEMM 0
#endif

namespace wmss_native {
namespace bf16_gemm {

constexpr int64_t LANES = 16;              // float32 lanes of a 512-bit vector
constexpr int64_t PANEL_VECTORS = 4;       // vectors of columns per micro tile
constexpr int64_t PANEL = LANES * PANEL_VECTORS;  // weight rows per packed panel
constexpr int64_t MICRO_ROWS = 6;          // rows of A per micro tile
constexpr int64_t K_SLICE = 256;           // pairs of k per slice (512 hidden units)

// Whether this build has the kernel (compiled for a CPU with AVX512-BF16: -march=native).
constexpr bool available() { return WMSS_HAVE_BF16_GEMM == 1; }

inline int64_t pairs_of(int64_t k) { return (k + 1) / 2; }
inline int64_t panels_of(int64_t rows) { return (rows + PANEL - 1) / PANEL; }

// A bf16 [M, K] matrix as the [M, pairs] int32 the kernel reads (row stride: the result's
// stride(0)). A view where ATen can reinterpret the bf16 values as int32 (K even, unit column
// stride, an even row stride and an even storage offset: e.g. any row block of a contiguous
// matrix with even K, or a column slice of even-width rows); else a contiguous copy, padded with
// a zero column when K is odd.
inline at::Tensor as_pairs(const at::Tensor& a) {
  const int64_t m = a.size(0), k = a.size(1);
  const bool viewable = k > 0 && k % 2 == 0 && a.stride(1) == 1 && a.stride(0) % 2 == 0 &&
                        a.storage_offset() % 2 == 0;
  if (viewable) return a.view(at::kInt);
  at::Tensor rows = at::empty({m, 2 * pairs_of(k)}, a.options());
  rows.narrow(1, 0, k).copy_(a);
  if (k % 2 != 0) rows.narrow(1, k, 1).zero_();
  return rows.view(at::kInt);
}

// B ([rows, K] bf16, any strides) packed into panels: an int32 tensor of
// panels_of(rows) * pairs * PANEL elements, panel q at q * pairs * PANEL; rows past `rows` and
// the padding k are zero, so a panel's missing columns compute as zeros.
inline at::Tensor pack_panels(const at::Tensor& b) {
  const at::Tensor pairs_view = as_pairs(b);  // [rows, pairs]
  const int64_t rows = b.size(0), pairs = pairs_view.size(1), panels = panels_of(rows);
  const int64_t row_stride = pairs_view.stride(0);
  at::Tensor packed = at::zeros({panels * pairs * PANEL}, b.options().dtype(at::kInt));
  const int32_t* src = pairs_view.data_ptr<int32_t>();
  int32_t* dst = packed.data_ptr<int32_t>();
  at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
    for (int64_t q = first; q < last; ++q) {
      int32_t* panel = dst + q * pairs * PANEL;
      const int64_t count = std::min(PANEL, rows - q * PANEL);
      for (int64_t j = 0; j < count; ++j) {
        const int32_t* row = src + (q * PANEL + j) * row_stride;
        for (int64_t p = 0; p < pairs; ++p) panel[p * PANEL + j] = row[p];
      }
    }
  });
  return packed;
}

#if WMSS_HAVE_BF16_GEMM

// C[R, cols] (+)= A[R, pairs] x panel[pairs, PANEL] for one micro tile; cols <= PANEL columns are
// stored (masked), `add` keeps what C holds (the K slices after the first).
template <int R>
inline void micro_tile(const int32_t* a, int64_t lda, const int32_t* panel, int64_t pairs,
                       float* c, int64_t ldc, int64_t cols, bool add) {
  __m512 acc[R][PANEL_VECTORS];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < PANEL_VECTORS; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const int32_t* column = panel + p * PANEL;
    __m512bh b[PANEL_VECTORS];
    for (int v = 0; v < PANEL_VECTORS; ++v) {
      b[v] = (__m512bh)_mm512_loadu_si512(column + v * LANES);
    }
    for (int r = 0; r < R; ++r) {
      int32_t bits;  // A's pair (k = 2p, 2p + 1) of row r, read as bytes (the storage is bf16)
      std::memcpy(&bits, a + r * lda + p, sizeof bits);
      const __m512bh pair = (__m512bh)_mm512_set1_epi32(bits);
      for (int v = 0; v < PANEL_VECTORS; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], pair, b[v]);
    }
  }
  for (int v = 0; v < PANEL_VECTORS; ++v) {
    const int64_t left = cols - v * LANES;
    if (left <= 0) break;
    const __mmask16 mask = left >= LANES ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    for (int r = 0; r < R; ++r) {
      float* out = c + r * ldc + v * LANES;
      __m512 value = acc[r][v];
      if (add) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, out));
      _mm512_mask_storeu_ps(out, mask, value);
    }
  }
}

inline void micro_tile_rows(int64_t rows, const int32_t* a, int64_t lda, const int32_t* panel,
                            int64_t pairs, float* c, int64_t ldc, int64_t cols, bool add) {
  switch (rows) {
    case 6: micro_tile<6>(a, lda, panel, pairs, c, ldc, cols, add); break;
    case 5: micro_tile<5>(a, lda, panel, pairs, c, ldc, cols, add); break;
    case 4: micro_tile<4>(a, lda, panel, pairs, c, ldc, cols, add); break;
    case 3: micro_tile<3>(a, lda, panel, pairs, c, ldc, cols, add); break;
    case 2: micro_tile<2>(a, lda, panel, pairs, c, ldc, cols, add); break;
    default: micro_tile<1>(a, lda, panel, pairs, c, ldc, cols, add); break;
  }
}

#endif  // WMSS_HAVE_BF16_GEMM

// C[M, cols] = A B^T on the calling thread: a ([M, pairs] int32, as_pairs), packed (the
// pack_panels of B's cols rows), c row-major with row stride ldc. Only call when available().
inline void logits(const at::Tensor& a, const at::Tensor& packed, int64_t cols, float* c,
                   int64_t ldc) {
#if WMSS_HAVE_BF16_GEMM
  const int64_t m = a.size(0), pairs = a.size(1), lda = a.stride(0);
  TORCH_CHECK(pairs > 0, "wmss_native: the bf16 kernel needs a hidden size of at least 1");
  TORCH_CHECK(packed.numel() == panels_of(cols) * pairs * PANEL,
              "wmss_native: packed panels do not match ", cols, " rows of ", pairs, " pairs");
  const int32_t* a_data = a.data_ptr<int32_t>();
  const int32_t* panels = packed.data_ptr<int32_t>();
  for (int64_t p0 = 0; p0 < pairs; p0 += K_SLICE) {
    const int64_t slice = std::min(K_SLICE, pairs - p0);
    for (int64_t j0 = 0; j0 < cols; j0 += PANEL) {
      const int32_t* panel = panels + (j0 / PANEL) * pairs * PANEL + p0 * PANEL;
      const int64_t width = std::min(PANEL, cols - j0);
      for (int64_t r0 = 0; r0 < m; r0 += MICRO_ROWS) {
        micro_tile_rows(std::min(MICRO_ROWS, m - r0), a_data + r0 * lda + p0, lda, panel, slice,
                        c + r0 * ldc + j0, ldc, width, p0 > 0);
      }
    }
  }
#else
  (void)a, (void)packed, (void)cols, (void)c, (void)ldc;
  TORCH_CHECK(false, "wmss_native: the bf16 kernel is not built for this CPU (no AVX512-BF16)");
#endif
}

}  // namespace bf16_gemm
}  // namespace wmss_native
