// textgen's int4 x int8 matmul for AVX2 CPUs (textgen/models/q4.py builds and loads it).
//
// Weights are Q4_1: in blocks of 32 input columns, 4-bit codes with a scale d and a minimum m
// (float16), w = code * d + m; stored as kGroupBytes says.
// Activations are rounded to int8 in the same blocks of 32 (scale = max |x| / 127), so that a
// block's 32 products are one vpmaddubsw: out[i, n] = sum over blocks b of
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
// Weights are stored by 4 output rows and 8 blocks (256 columns): the 4 rows' scales and
// minimums (float16 [4][2][8], 128 bytes), then the codes of the 4 pairs of blocks, each
// [4 rows][32 bytes] (byte j of a block: column j in the low nibble, j + 16 in the high).
// One sequential stream for the 4 rows; a last group of fewer than 8 blocks is padded.
constexpr int64_t kGroupBytes = 128 + 4 * 128;

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

// Output rows 4n .. 4n + 3 of activation row m. Per (m, n): per pair of blocks one integer dot
// product of 64 columns in two 8-lane halves, scaled and added into one vector; the minimums'
// term over groups of 8 blocks into another; lanes summed last. The same operations in the same
// order whatever the number of rows of the call.
inline void quad(int64_t m, int64_t n, int64_t K, int64_t N, const int8_t* q, const float* dx,
                 const float* sx, const uint8_t* packed, float* out) {
  const int64_t B = K / kBlock, P = padded_blocks(B), G = P / 8;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int8_t* qm = q + m * K;
  const uint8_t* weights = packed + n * G * kGroupBytes;
  __m256 acc[4], by_min[4];
  for (int r = 0; r < 4; r++) acc[r] = by_min[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    const uint8_t* group = weights + g * kGroupBytes;
    const uint16_t* dm = reinterpret_cast<const uint16_t*>(group);  // [4 rows][scale, min][8]
    const __m256 dxv = _mm256_loadu_ps(dx + m * P + 8 * g);
    const __m256 sxv = _mm256_loadu_ps(sx + m * P + 8 * g);
    __m256 scale[4];
    for (int r = 0; r < 4; r++) {
      scale[r] = _mm256_mul_ps(halves(dm + 16 * r), dxv);
      by_min[r] = _mm256_fmadd_ps(halves(dm + 16 * r + 8), sxv, by_min[r]);
    }
    const int64_t pairs = std::min<int64_t>(4, (B - 8 * g) / 2);
    for (int64_t i = 0; i < pairs; i++) {
      const int8_t* qp = qm + (4 * g + i) * 64;
      const __m256i qa = _mm256_loadu_si256((const __m256i*)qp);
      const __m256i qb = _mm256_loadu_si256((const __m256i*)(qp + 32));
      const int lane = 2 * (int)i;
      const __m256i spread = _mm256_setr_epi32(lane, lane, lane, lane, lane + 1, lane + 1,
                                               lane + 1, lane + 1);
      const uint8_t* codes = group + 128 + i * 128;  // [4 rows][32]
      for (int r = 0; r < 4; r++) {
        const __m256i c = _mm256_loadu_si256((const __m256i*)(codes + 32 * r));
        const __m256i lo = _mm256_and_si256(c, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low);
        const __m256i p16 =
            _mm256_add_epi16(_mm256_maddubs_epi16(lo, qa), _mm256_maddubs_epi16(hi, qb));
        const __m256i dot = _mm256_madd_epi16(p16, ones);
        acc[r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(scale[r], spread),
                                 _mm256_cvtepi32_ps(dot), acc[r]);
      }
    }
  }
  for (int r = 0; r < 4; r++) out[m * N + 4 * n + r] = sum_lanes(acc[r]) + sum_lanes(by_min[r]);
}

at::Tensor q4q8_mm(const at::Tensor& x_in, const at::Tensor& packed, int64_t columns) {
  TORCH_CHECK(x_in.dim() == 2 && packed.dim() == 3 && packed.scalar_type() == at::kByte,
              "q4q8_mm: x [rows, columns] and packed weights [output rows / 4, groups, ",
              kGroupBytes, "] uint8");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = 4 * packed.size(0), B = K / kBlock;
  TORCH_CHECK(K == columns && K % (2 * kBlock) == 0 && packed.size(1) == padded_blocks(B) / 8 &&
                  packed.size(2) == kGroupBytes && packed.is_contiguous(),
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
    for (int64_t m = 0; m < M; m++) quad(m, n, K, N, qp, dxp, sxp, wp, op);
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
