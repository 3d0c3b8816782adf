// textgen's int4 x int8 matmul for x86-64 CPUs with AVX2 (textgen/models/q4.py builds and
// loads it; with AVX-512 VL and VNNI where the CPU has them, for the same results).
//
// Weights are Q4_1: in blocks of 32 input columns, 4-bit codes with a scale d and a minimum m
// (float16), w = code * d + m; stored as kGroupBytes says.
// Activations are rounded to int8 in the same blocks of 32 (scale = max |x| / 127), so that a
// block's 32 products are one vpmaddubsw (or vpdpbusd): out[i, n] = sum over blocks b of
//   d[n,b] * dx[i,b] * dot(codes[n,b], q[i,b]) + m[n,b] * dx[i,b] * sum(q[i,b]).
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
// Weights are stored by 4 output rows and groups of 8 blocks (256 columns): the 4 rows' scales
// and minimums (float16 [4][2][8], 128 bytes), then the codes of the 4 pairs of blocks, each
// [4 rows][32 bytes] (byte j of a block: column j in the low nibble, j + 16 in the high).
// One sequential stream for the 4 rows, 80 bytes a block: a last group of b < 8 blocks holds
// [4][2][b] scales and minimums and b / 2 pairs.
constexpr int64_t kGroupBytes = 128 + 4 * 128;
constexpr int64_t kBlockBytes = kGroupBytes / 8;

// A vector of 8 float16 scales or minimums of a group of ``blocks`` blocks: lanes from
// ``blocks`` on hold the next bytes of the stream (the group's codes follow its scales), which
// the scales' lanes never reach and the minimums' mask clears (their activations are zeros).
inline __m256 lanes_below(int64_t blocks) {
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32((int)blocks), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// Activations rounded to int8, in the order the kernel reads them: for each pair of blocks
// (b, b + 1), columns 0-15 of b, 0-15 of b + 1, 16-31 of b, 16-31 of b + 1, which is how a
// 32-byte load of the pair's weight codes splits into low and high nibbles. Scales and
// scale x sum of codes are padded with zeros to whole groups of 8 blocks.
struct Rounded {
  at::Tensor q;     // int8 [M, K]
  at::Tensor d;     // float [M, padded blocks]
  at::Tensor dsum;  // float [M, padded blocks]
};

int64_t padded_blocks(int64_t blocks) { return (blocks + 7) / 8 * 8; }

Rounded round_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), B = K / kBlock, P = padded_blocks(B);
  Rounded r{at::empty({M, K}, x.options().dtype(at::kChar)),
            at::zeros({M, P}, x.options().dtype(at::kFloat)),
            at::zeros({M, P}, x.options().dtype(at::kFloat))};
  const float* xp = x.data_ptr<float>();
  int8_t* qp = r.q.data_ptr<int8_t>();
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
    // Rounded to the nearest (ties to even), as 32-bit integers, then narrowed to 8 bits
    // (packs interleave 128-bit lanes: the permute puts them back in order).
    __m256i n[4];
    for (int j = 0; j < 4; j++)
      n[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inverse)));
    const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]),
                                           _mm256_add_epi32(n[2], n[3]));
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]),
                                       _mm256_packs_epi32(n[2], n[3]));
    bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // Within the pair's 64 bytes: this block's first half at 16 * (b % 2), its second at 32 +.
    int8_t* out = qp + m * K + (b / 2) * 64 + (b % 2) * 16;
    _mm_storeu_si128((__m128i*)out, _mm256_castsi256_si128(bytes));
    _mm_storeu_si128((__m128i*)(out + 32), _mm256_extracti128_si256(bytes, 1));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    dp[m * P + b] = d;
    sp[m * P + b] = d * (float)_mm_cvtsi128_si32(s4);
  }
  return r;
}

inline float sum_lanes(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

inline __m256 halves(const uint16_t* p) {  // 8 float16 values as float32
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}

// The integer dot products of a pair of blocks: lane j sums columns 4j .. 4j + 3 of the pair's
// interleaved halves (exact either way: with VNNI one instruction per half, else vpmaddubsw's
// 16-bit pair sums, which cannot saturate with 4-bit codes, then vpmaddwd).
inline __m256i pair_dot(__m256i lo, __m256i hi, __m256i qa, __m256i qb) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, qa), hi, qb);
#else
  const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, qa), _mm256_maddubs_epi16(hi, qb));
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
#endif
}

// Rows per tile: each unpacking of 4 output rows' codes serves this many activation rows.
#if defined(__AVX512VL__)
constexpr int kTile = 4;  // 32 vector registers
#else
constexpr int kTile = 2;
#endif

// Output rows 4n .. 4n + 3 of activation rows m .. m + T - 1. Per (row, output row): per pair
// of blocks one integer dot product of 64 columns in two 8-lane halves, scaled and added into
// one vector; the minimums' term over groups of 8 blocks into another; lanes summed last. A
// row gets the same operations in the same order whatever T and the number of rows of the call.
template <int T>
inline void tile(int64_t m, int64_t n, int64_t K, int64_t N, const int8_t* q, const float* dx,
                 const float* sx, const uint8_t* packed, float* out) {
  const int64_t B = K / kBlock, P = padded_blocks(B), G = P / 8;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const uint8_t* weights = packed + n * B * kBlockBytes;
  __m256 acc[T][4];
  for (int t = 0; t < T; t++)
    for (int r = 0; r < 4; r++) acc[t][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    const uint8_t* group = weights + g * kGroupBytes;
    const int64_t blocks = std::min<int64_t>(8, B - 8 * g);
    const uint16_t* dm = reinterpret_cast<const uint16_t*>(group);  // [4 rows][2][blocks]
    __m256 scale[T][4];
    for (int r = 0; r < 4; r++) {
      const __m256 d = halves(dm + 2 * blocks * r);
      for (int t = 0; t < T; t++)
        scale[t][r] = _mm256_mul_ps(d, _mm256_loadu_ps(dx + (m + t) * P + 8 * g));
    }
    const int64_t pairs = blocks / 2;
    for (int64_t i = 0; i < pairs; i++) {
      const int lane = 2 * (int)i;
      const __m256i spread = _mm256_setr_epi32(lane, lane, lane, lane, lane + 1, lane + 1,
                                               lane + 1, lane + 1);
      __m256i qa[T], qb[T];
      for (int t = 0; t < T; t++) {
        const int8_t* qp = q + (m + t) * K + (4 * g + i) * 64;
        qa[t] = _mm256_loadu_si256((const __m256i*)qp);
        qb[t] = _mm256_loadu_si256((const __m256i*)(qp + 32));
      }
      const uint8_t* codes = group + 16 * blocks + i * 128;  // [4 rows][32]
      for (int r = 0; r < 4; r++) {
        const __m256i c = _mm256_loadu_si256((const __m256i*)(codes + 32 * r));
        const __m256i lo = _mm256_and_si256(c, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low);
        for (int t = 0; t < T; t++) {
          const __m256i dot = pair_dot(lo, hi, qa[t], qb[t]);
          acc[t][r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(scale[t][r], spread),
                                      _mm256_cvtepi32_ps(dot), acc[t][r]);
        }
      }
    }
  }
  for (int t = 0; t < T; t++) {
    for (int r = 0; r < 4; r++) {
      __m256 by_min = _mm256_setzero_ps();
      for (int64_t g = 0; g < G; g++) {
        const int64_t blocks = std::min<int64_t>(8, B - 8 * g);
        const uint16_t* dm = reinterpret_cast<const uint16_t*>(weights + g * kGroupBytes);
        const __m256 sxv = _mm256_loadu_ps(sx + (m + t) * P + 8 * g);
        const __m256 mins = _mm256_and_ps(halves(dm + 2 * blocks * r + blocks), lanes_below(blocks));
        by_min = _mm256_fmadd_ps(mins, sxv, by_min);
      }
      out[(m + t) * N + 4 * n + r] = sum_lanes(acc[t][r]) + sum_lanes(by_min);
    }
  }
}

at::Tensor q4q8_mm(const at::Tensor& x_in, const at::Tensor& packed, int64_t columns) {
  TORCH_CHECK(x_in.dim() == 2 && packed.dim() == 3 && packed.scalar_type() == at::kByte,
              "q4q8_mm: x [rows, columns] and packed weights [output rows / 4, blocks, ",
              kBlockBytes, "] uint8");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = 4 * packed.size(0), B = K / kBlock;
  TORCH_CHECK(K == columns && K % (2 * kBlock) == 0 && packed.size(1) == B &&
                  packed.size(2) == kBlockBytes && packed.is_contiguous(),
              "q4q8_mm: weights of ", columns, " columns do not match activations of ", K);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const Rounded r = round_rows(x);
  const int8_t* qp = r.q.data_ptr<int8_t>();
  const float* dxp = r.d.data_ptr<float>();
  const float* sxp = r.dsum.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  // OpenMP directly, not at::parallel_for: in its lambda the compiler kept the loop's state in
  // memory (2x slower). PyTorch's thread count, as the rest of the step uses.
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N / 4; n++) {
    int64_t m = 0;
    for (; m + kTile <= M; m += kTile) tile<kTile>(m, n, K, N, qp, dxp, sxp, wp, op);
    for (; m < M; m++) tile<1>(m, n, K, N, qp, dxp, sxp, wp, op);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(textgen, m) { m.def("q4q8_mm(Tensor x, Tensor packed, int columns) -> Tensor"); }

TORCH_LIBRARY_IMPL(textgen, CPU, m) { m.impl("q4q8_mm", q4q8_mm); }

// The entry point compiled decoders call directly (Inductor's custom_ops_to_c_shims), without
// a trip through the dispatcher.
extern "C" AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_q4q8_mm(
    AtenTensorHandle x, AtenTensorHandle packed, int64_t columns, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    at::Tensor out = q4q8_mm(*torch::aot_inductor::tensor_handle_to_tensor_pointer(x),
                             *torch::aot_inductor::tensor_handle_to_tensor_pointer(packed), columns);
    *ret = torch::aot_inductor::new_tensor_handle(std::move(out));
  });
}
