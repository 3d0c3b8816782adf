// textgen's matmuls of block-quantized weights for x86-64 CPUs with AVX2 (textgen/models/
// blockwise.py builds and loads them; with AVX-512 VL and VNNI where the CPU has them, for the
// same results). Two weight formats, in blocks of 32 input columns with float16 scales:
// - Q4 (Q4_1): 4-bit codes u with a scale d and a minimum m, w = d * u + m;
// - Q8: 8-bit codes u = round(w / d) + 128 (1..255) with a scale d, w = d * u - 128 d (as Q4
//   with m = -128 d; Q8_0's precision).
// Activations are rounded in the same blocks of 32 to two int8 digits, x = s * (q + f / 256)
// with s = max |x| / 127 (the error at most s / 512, about what 16-bit integers give: one int8
// digit alone flipped near ties of real models' answers), so that a block's 32 products are a
// few integer instructions per digit (vpmaddubsw, or vpdpbusd), combined exactly as
// 256 * dot(u, q) + dot(u, f):
//   out[i, n] = sum over blocks b of d[n,b] * dx[i,b] * (256 dot(u, q) + dot(u, f))
//               + m[n,b] * dx[i,b] * (256 sum(q) + sum(f)),  with dx = s / 256.
// Batch-invariant by construction: a row's result is computed by the same instructions in the
// same order whatever the number of rows (the integer dot products are exact, the float sums
// run over the blocks in order), so it does not depend on the rows that share the call.

#include <ATen/Parallel.h>
#include <omp.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kBlock = 32;

// Weights are stored by 4 output rows and groups of 8 blocks (256 columns): the 4 rows' float16
// scales (and Q4's minimums), [4 rows][2][8] for Q4 and [4 rows][8] for Q8, then the codes of the
// 4 pairs of blocks, each [4 rows][bytes of a pair]: for Q4 32 bytes (byte j of a block: column
// j in the low nibble, j + 16 in the high), for Q8 64 (columns 0-15 of the first block, 0-15
// of the second, 16-31 of the first, 16-31 of the second: as Q4's nibbles unpack). One
// sequential stream for the 4 rows; a last group of b < 8 blocks holds b blocks' scales and
// b / 2 pairs.

// A vector of 8 float16 scales or minimums of a group of ``blocks`` blocks: lanes from
// ``blocks`` on hold the next bytes of the stream (the group's codes follow its scales), which
// the scales' lanes never reach and the minimums' mask clears (their activations are zeros).
inline __m256 lanes_below(int64_t blocks) {
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32((int)blocks), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

inline __m256 halves(const uint16_t* p) {  // 8 float16 values as float32
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}

inline float sum_lanes(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

// Activations rounded to two int8 digits, in the order the kernel reads them: for each pair of
// blocks (b, b + 1), columns 0-15 of b, 0-15 of b + 1, 16-31 of b, 16-31 of b + 1, which is how
// a 32-byte load of the pair's weight codes splits into low and high nibbles. Scales and
// scale x sum of digits are padded with zeros to whole groups of 8 blocks.
struct Rounded {
  at::Tensor q;     // int8 [M, K]: the first digit
  at::Tensor f;     // int8 [M, K]: the second, in 256ths of the first's unit
  at::Tensor d;     // float [M, padded blocks]: the unit of the second digit
  at::Tensor dsum;  // float [M, padded blocks]
};

// 32 int32 lanes (4 vectors) narrowed to int8 with saturation, in order (packs interleave
// 128-bit lanes: the permute puts them back), stored as a block's two halves at out, out + 32.
inline void store_digits(const __m256i n[4], int8_t* out) {
  __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]),
                                     _mm256_packs_epi32(n[2], n[3]));
  bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm_storeu_si128((__m128i*)out, _mm256_castsi256_si128(bytes));
  _mm_storeu_si128((__m128i*)(out + 32), _mm256_extracti128_si256(bytes, 1));
}

inline int32_t sum_ints(const __m256i n[4]) {
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  return _mm_cvtsi128_si32(s4);
}

int64_t padded_blocks(int64_t blocks) { return (blocks + 7) / 8 * 8; }

Rounded round_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), B = K / kBlock, P = padded_blocks(B);
  Rounded r{at::empty({M, K}, x.options().dtype(at::kChar)),
            at::empty({M, K}, x.options().dtype(at::kChar)),
            at::zeros({M, P}, x.options().dtype(at::kFloat)),
            at::zeros({M, P}, x.options().dtype(at::kFloat))};
  const float* xp = x.data_ptr<float>();
  int8_t* qp = r.q.data_ptr<int8_t>();
  int8_t* fp = r.f.data_ptr<int8_t>();
  float* dp = r.d.data_ptr<float>();
  float* sp = r.dsum.data_ptr<float>();
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (M * B >= 1024)
  for (int64_t i = 0; i < M * B; i++) {
    const int64_t m = i / B, b = i % B;
    const float* block = xp + m * K + b * kBlock;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int j = 0; j < 4; j++) {
      v[j] = _mm256_loadu_ps(block + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 top = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    top = _mm_max_ps(top, _mm_movehl_ps(top, top));
    const float largest = _mm_cvtss_f32(_mm_max_ss(top, _mm_movehdup_ps(top)));
    const float d = largest / 127.f, inverse = largest > 0.f ? 127.f / largest : 0.f;
    // The first digit rounded to the nearest (ties to even); the remainder (exact in float32,
    // at most 1/2) in 256ths, rounded the same way and clamped to 127 (128 only at exactly 1/2).
    __m256i n[4], f[4];
    for (int j = 0; j < 4; j++) {
      const __m256 y = _mm256_mul_ps(v[j], _mm256_set1_ps(inverse));
      n[j] = _mm256_cvtps_epi32(y);
      const __m256 rest = _mm256_sub_ps(y, _mm256_cvtepi32_ps(n[j]));
      f[j] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(rest, _mm256_set1_ps(256.f))),
                              _mm256_set1_epi32(127));
    }
    // Within the pair's 64 bytes: this block's first half at 16 * (b % 2), its second at 32 +.
    const int64_t at = m * K + (b / 2) * 64 + (b % 2) * 16;
    store_digits(n, qp + at);
    store_digits(f, fp + at);
    const float unit = d / 256.f;
    dp[m * P + b] = unit;
    sp[m * P + b] = unit * (float)(256 * sum_ints(n) + sum_ints(f));
  }
  return r;
}

// An activation row's two digits over a pair of blocks (64 bytes each), loaded once for the 4
// output rows of a tile (loading them per output row cost 15-20% at 16 rows).
struct Digits {
  __m256i qa, qb, fa, fb;
};

inline Digits load_digits(const int8_t* q, const int8_t* f) {
  return {_mm256_loadu_si256((const __m256i*)q), _mm256_loadu_si256((const __m256i*)(q + 32)),
          _mm256_loadu_si256((const __m256i*)f), _mm256_loadu_si256((const __m256i*)(f + 32))};
}

// The integer dot products of a pair of blocks, 256 x the first digits' plus the second's:
// lane j sums columns 4j .. 4j + 3 of the pair's interleaved halves (exact either way, at most
// 256 x 8 x 255 x 128 < 2^31: with VNNI one instruction per half and digit, else vpmaddubsw's
// 16-bit pair sums, which cannot saturate with codes up to 15, then vpmaddwd).
inline __m256i pair_dot(__m256i lo, __m256i hi, const Digits& x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  const __m256i first = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, x.qa), hi, x.qb);
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_slli_epi32(first, 8), lo, x.fa), hi, x.fb);
#else
  const __m256i first = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x.qa), _mm256_maddubs_epi16(hi, x.qb));
  const __m256i second = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x.fa), _mm256_maddubs_epi16(hi, x.fb));
  return _mm256_add_epi32(_mm256_madd_epi16(first, _mm256_set1_epi16(256)),
                          _mm256_madd_epi16(second, _mm256_set1_epi16(1)));
#endif
}

// Rows per tile: each unpacking of 4 output rows' codes serves this many activation rows.
#if defined(__AVX512VL__)
constexpr int kTile = 4;  // 32 vector registers
#else
constexpr int kTile = 2;
#endif

// The weight formats: where a group's scales, minimums and codes are, and a pair of blocks'
// integer dot products with both activation digits (lane j: columns 4j .. 4j + 3 of the pair's
// interleaved halves; lanes 0-3 the first block, 4-7 the second).
struct Q4 {
  static constexpr int64_t kScaleBytes = 4 * 2 * 2;  // a block's, for the 4 rows
  static constexpr int64_t kPairBytes = 4 * 32;
  static constexpr int64_t kBlockBytes = kScaleBytes + kPairBytes / 2;  // 80: 0.625 a weight
  struct Codes {
    __m256i lo, hi;
  };
  static const uint16_t* scales(const uint16_t* dm, int64_t blocks, int r) {
    return dm + 2 * blocks * r;
  }
  static __m256 minimums(const uint16_t* dm, int64_t blocks, int r) {
    return _mm256_and_ps(halves(dm + 2 * blocks * r + blocks), lanes_below(blocks));
  }
  static Codes unpack(const uint8_t* pair, int r) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i c = _mm256_loadu_si256((const __m256i*)(pair + 32 * r));
    return {_mm256_and_si256(c, low), _mm256_and_si256(_mm256_srli_epi16(c, 4), low)};
  }
  static __m256i dot(const Codes& c, const Digits& x) {
    return pair_dot(c.lo, c.hi, x);
  }
};

struct Q8 {
  static constexpr int64_t kScaleBytes = 4 * 2;
  static constexpr int64_t kPairBytes = 4 * 64;
  static constexpr int64_t kBlockBytes = kScaleBytes + kPairBytes / 2;  // 136: 1.0625 a weight
  static const uint16_t* scales(const uint16_t* d, int64_t blocks, int r) { return d + blocks * r; }
  static __m256 minimums(const uint16_t* d, int64_t blocks, int r) {
    return _mm256_and_ps(_mm256_mul_ps(halves(d + blocks * r), _mm256_set1_ps(-128.f)),
                         lanes_below(blocks));
  }
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  struct Codes {
    __m256i lo, hi;
  };
  static Codes unpack(const uint8_t* pair, int r) {
    const uint8_t* row = pair + 64 * r;
    return {_mm256_loadu_si256((const __m256i*)row), _mm256_loadu_si256((const __m256i*)(row + 32))};
  }
  static __m256i dot(const Codes& c, const Digits& x) {
    return pair_dot(c.lo, c.hi, x);  // vpdpbusd takes codes up to 255 whole
  }
#else
  // vpmaddubsw's 16-bit pair sums would saturate with codes over 128: the codes are split into
  // nibbles, dot(u, .) = 16 dot(u >> 4, .) + dot(u & 15, .), the same integers as with VNNI.
  struct Codes {
    __m256i lo_low, hi_low, lo_high, hi_high;
  };
  static Codes unpack(const uint8_t* pair, int r) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const uint8_t* row = pair + 64 * r;
    const __m256i lo = _mm256_loadu_si256((const __m256i*)row);
    const __m256i hi = _mm256_loadu_si256((const __m256i*)(row + 32));
    return {_mm256_and_si256(lo, low), _mm256_and_si256(hi, low),
            _mm256_and_si256(_mm256_srli_epi16(lo, 4), low),
            _mm256_and_si256(_mm256_srli_epi16(hi, 4), low)};
  }
  static __m256i dot(const Codes& c, const Digits& x) {
    return _mm256_add_epi32(_mm256_slli_epi32(pair_dot(c.lo_high, c.hi_high, x), 4),
                            pair_dot(c.lo_low, c.hi_low, x));
  }
#endif
};

// Output rows 4n .. 4n + 3 (those below N) of activation rows m .. m + T - 1. Per (row, output
// row): per pair of blocks one integer dot product of 64 columns in two 8-lane halves, scaled
// and added into one vector; the minimums' term over groups of 8 blocks into another; lanes
// summed last. A row gets the same operations in the same order whatever T and the number of
// rows of the call.
template <class F, int T>
inline void tile(int64_t m, int64_t n, int64_t K, int64_t N, const int8_t* q, const int8_t* f,
                 const float* dx, const float* sx, const uint8_t* packed, float* out) {
  const int64_t B = K / kBlock, P = padded_blocks(B), G = P / 8;
  const uint8_t* weights = packed + n * B * F::kBlockBytes;
  __m256 acc[T][4];
  for (int t = 0; t < T; t++)
    for (int r = 0; r < 4; r++) acc[t][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    const uint8_t* group = weights + g * 8 * F::kBlockBytes;
    const int64_t blocks = std::min<int64_t>(8, B - 8 * g);
    const uint16_t* dm = reinterpret_cast<const uint16_t*>(group);
    __m256 scale[T][4];
    for (int r = 0; r < 4; r++) {
      const __m256 d = halves(F::scales(dm, blocks, r));
      for (int t = 0; t < T; t++)
        scale[t][r] = _mm256_mul_ps(d, _mm256_loadu_ps(dx + (m + t) * P + 8 * g));
    }
    const int64_t pairs = blocks / 2;
    for (int64_t i = 0; i < pairs; i++) {
      const int lane = 2 * (int)i;
      const __m256i spread = _mm256_setr_epi32(lane, lane, lane, lane, lane + 1, lane + 1,
                                               lane + 1, lane + 1);
      const int64_t at = m * K + (4 * g + i) * 64;
      const uint8_t* pair = group + F::kScaleBytes * blocks + i * F::kPairBytes;
      Digits x[T];
      for (int t = 0; t < T; t++) x[t] = load_digits(q + at + t * K, f + at + t * K);
      for (int r = 0; r < 4; r++) {
        const typename F::Codes codes = F::unpack(pair, r);
        for (int t = 0; t < T; t++) {
          const __m256i dot = F::dot(codes, x[t]);
          acc[t][r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(scale[t][r], spread),
                                      _mm256_cvtepi32_ps(dot), acc[t][r]);
        }
      }
    }
  }
  for (int t = 0; t < T; t++) {
    for (int r = 0; r < 4 && 4 * n + r < N; r++) {
      __m256 by_min = _mm256_setzero_ps();
      for (int64_t g = 0; g < G; g++) {
        const int64_t blocks = std::min<int64_t>(8, B - 8 * g);
        const uint16_t* dm = reinterpret_cast<const uint16_t*>(weights + g * 8 * F::kBlockBytes);
        const __m256 sxv = _mm256_loadu_ps(sx + (m + t) * P + 8 * g);
        by_min = _mm256_fmadd_ps(F::minimums(dm, blocks, r), sxv, by_min);
      }
      out[(m + t) * N + 4 * n + r] = sum_lanes(acc[t][r]) + sum_lanes(by_min);
    }
  }
}

// x [M, K] times the packed weights of N output rows ([ceil(N / 4), K / 32, kBlockBytes]),
// transposed: [M, N] float32.
template <class F>
at::Tensor matmul(const char* name, const at::Tensor& x_in, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x_in.dim() == 2 && packed.dim() == 3 && packed.scalar_type() == at::kByte,
              name, ": x [rows, columns] and packed weights [output rows / 4, blocks, ",
              F::kBlockBytes, "] uint8");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), B = K / kBlock;
  TORCH_CHECK(K % (2 * kBlock) == 0 && packed.size(1) == B && packed.size(2) == F::kBlockBytes &&
                  packed.is_contiguous(),
              name, ": packed weights of ", packed.size(1), " blocks do not match activations of ",
              K, " columns");
  TORCH_CHECK(N >= 0 && (N + 3) / 4 == packed.size(0), name, ": ", N,
              " output rows do not match packed weights of ", packed.size(0), " groups of 4");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const Rounded r = round_rows(x);
  const int8_t* qp = r.q.data_ptr<int8_t>();
  const int8_t* fp = r.f.data_ptr<int8_t>();
  const float* dxp = r.d.data_ptr<float>();
  const float* sxp = r.dsum.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  // OpenMP directly, not at::parallel_for: in its lambda the compiler kept the loop's state in
  // memory (2x slower). PyTorch's thread count, as the rest of the step uses.
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < packed.size(0); n++) {
    int64_t m = 0;
    for (; m + kTile <= M; m += kTile) tile<F, kTile>(m, n, K, N, qp, fp, dxp, sxp, wp, op);
    for (; m < M; m++) tile<F, 1>(m, n, K, N, qp, fp, dxp, sxp, wp, op);
  }
  return out;
}

at::Tensor q4_mm(const at::Tensor& x, const at::Tensor& packed, int64_t rows) {
  return matmul<Q4>("q4_mm", x, packed, rows);
}

at::Tensor q8_mm(const at::Tensor& x, const at::Tensor& packed, int64_t rows) {
  return matmul<Q8>("q8_mm", x, packed, rows);
}

}  // namespace

TORCH_LIBRARY(textgen, m) {
  m.def("q4_mm(Tensor x, Tensor packed, int rows) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor packed, int rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(textgen, CPU, m) {
  m.impl("q4_mm", q4_mm);
  m.impl("q8_mm", q8_mm);
}

// The entry points compiled decoders call directly (Inductor's custom_ops_to_c_shims), without
// a trip through the dispatcher.
#define TEXTGEN_C_SHIM(op)                                                                    \
  extern "C" AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_##op(                           \
      AtenTensorHandle x, AtenTensorHandle packed, int64_t rows, AtenTensorHandle* ret) {    \
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({                                              \
      at::Tensor out = op(*torch::aot_inductor::tensor_handle_to_tensor_pointer(x),           \
                          *torch::aot_inductor::tensor_handle_to_tensor_pointer(packed), rows); \
      *ret = torch::aot_inductor::new_tensor_handle(std::move(out));                          \
    });                                                                                       \
  }

TEXTGEN_C_SHIM(q4_mm)
TEXTGEN_C_SHIM(q8_mm)
