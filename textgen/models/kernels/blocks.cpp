// textgen's matmuls of block-quantized weights for x86-64 CPUs with AVX2 (textgen/models/
// blockwise.py builds and loads them; with AVX-512 VL and VNNI where the CPU has them, for the
// same results). Two weight formats, in blocks of 32 input columns with float16 scales:
// - Q4 (Q4_1): 4-bit codes u with a scale d and a minimum m, w = d * u + m;
// - Q8: 8-bit codes u = round(w / d) + 128 (1..255) with a scale d, w = d * u - 128 d (as Q4
//   with m = -128 d; Q8_0's precision).
// Activations are rounded in the same blocks of 32 to two int8 digits, x = s * (q + f / 256)
// with s = max |x| / 127 (the error at most s / 512, about what 16-bit integers give: one int8
// digit alone flipped near ties of real models' answers), so that a block's 32 products are a
// few integer instructions per digit (vpdpbusd, or vpmaddubsw), combined exactly as
// 256 * dot(u, q) + dot(u, f):
//   out[i, n] = sum over blocks b, in order, of d[n,b] * dx[i,b] * (256 dot(u, q) + dot(u, f))
//               + m[n,b] * dx[i,b] * (256 sum(q) + sum(f)),  with dx = s / 256.
// A process may take one digit instead (set_activation_digits(1): x = s * q, dx = s, the
// integer work halved; llama.cpp's Q8 activations, error at most s / 2), for the whole process:
// a row's result then depends on the setting, still not on the other rows.
// Weights are held by groups of 8 output rows, one row per 32-bit lane of a vector: 4 codes of
// a row against 4 activation digits broadcast to every lane is one instruction for 8 rows
// (llama.cpp's kernels put columns in the lanes instead, and pay a float multiply-add and a
// horizontal sum per block and row); with VNNI a broadcast serves two groups (16 rows). Each
// row's float sum is one lane's, over the blocks in order, so it is batch-invariant by
// construction: a row's result is computed by the same instructions in the same order whatever
// the number of rows of the call.
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
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRows = 8;  // output rows of a group: one per 32-bit lane

// A group's weights, block after block, each: the 8 rows' float16 scales (Q4: then their
// minimums), then the codes as vectors of 8 lanes, lane r holding 4 codes of row r: for Q4 4
// vectors, vector k's byte i in lane r the codes of columns 8k + i (low nibble) and 8k + 4 + i
// (high); for Q8 8 vectors, vector k's byte i in lane r the code of column 4k + i.

inline __m256 halves(const uint8_t* p) {  // 8 float16 values as float32
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}

inline __m256i nibbles(__m256i bytes, bool high) {  // each byte's low or high 4 bits
  const __m256i shifted = high ? _mm256_srli_epi16(bytes, 4) : bytes;
  return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F));
}

inline __m256i spread(const int8_t* x) {  // 4 activation digits to every lane
  int32_t four;
  std::memcpy(&four, x, 4);
  return _mm256_set1_epi32(four);
}

// The activation digits of every call in the process: 2, or 1 (set_activation_digits).
std::atomic<int> activation_digits{2};

// Activations rounded to D int8 digits, [M, K] each in their natural order, with per row and
// block the unit of the last digit and that unit x the block's sum of the digits. They live
// in the calling thread's scratch buffers, reused by its next call: a decode step makes about
// 120 calls, and allocating four tensors in each was a measurable part of a one-row step.
struct Rounded {
  int8_t* q;     // [M, K]: the first digit
  int8_t* f;     // [M, K]: the second, in 256ths of the first's unit (two digits only)
  float* d;      // [M, K / 32]: the unit of the last digit
  float* dsum;   // [M, K / 32]
};

// 32 int32 lanes (4 vectors) narrowed to int8 with saturation, in order (packs interleave
// 128-bit lanes: the permute puts them back).
inline void store_digits(const __m256i n[4], int8_t* out) {
  __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]),
                                     _mm256_packs_epi32(n[2], n[3]));
  bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256((__m256i*)out, bytes);
}

inline int32_t sum_ints(const __m256i n[4]) {
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  return _mm_cvtsi128_si32(s4);
}

template <int D>
Rounded round_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), B = K / kBlock;
  thread_local std::vector<int8_t> digits;
  thread_local std::vector<float> units;
  if ((int64_t)digits.size() < 2 * M * K) digits.resize(2 * M * K);
  if ((int64_t)units.size() < 2 * M * B) units.resize(2 * M * B);
  const Rounded r{digits.data(), digits.data() + M * K, units.data(), units.data() + M * B};
  const float* xp = x.data_ptr<float>();
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (M * B >= 1024)
  for (int64_t i = 0; i < M * B; i++) {
    const float* block = xp + i * kBlock;
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
    store_digits(n, r.q + i * kBlock);
    if constexpr (D == 2) {
      store_digits(f, r.f + i * kBlock);
      const float unit = d / 256.f;
      r.d[i] = unit;
      r.dsum[i] = unit * (float)(256 * sum_ints(n) + sum_ints(f));
    } else {
      r.d[i] = d;
      r.dsum[i] = d * (float)sum_ints(n);
    }
  }
  return r;
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

// A block's exact integer dot products 256 dot(u, q) + dot(u, f) of G groups of 8 output rows
// (lanes) with T activation rows (q, f: the block's first digits of row 0, rows K bytes apart),
// into dq[g][t] (first digits) and df[g][t] (with D = 1 digit: dq alone, df left zero): vector
// k of a group's codes (4 a lane, from code(g, k)) against digits 4k .. 4k + 3. Each digit
// broadcast serves the G groups. With VNNI
// one vpdpbusd per vector, group, row and digit (the sums stay below 2^31: 32 x 255 x 128 x
// 257). Without, vpmaddubsw's 16-bit pair sums of codes below 16, added in 16 bits over the
// block (at most 16 products of 15 x 128 a lane: 30,720), then vpmaddwd: the same integers.
template <int T, int G, int D, class Code>
inline void block_dots(Code code, const int8_t* q, const int8_t* f, int64_t K,
                       __m256i (&dq)[G][T], __m256i (&df)[G][T]) {
  #pragma GCC unroll 8
  for (int g = 0; g < G; g++)
    #pragma GCC unroll 8
    for (int t = 0; t < T; t++) dq[g][t] = df[g][t] = _mm256_setzero_si256();
  #pragma GCC unroll 8
  for (int k = 0; k < 8; k++) {
    __m256i codes[G];
    #pragma GCC unroll 8
    for (int g = 0; g < G; g++) codes[g] = code(g, k);
    #pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
      // One digit's 4 activations of row t against every group's codes, into sums.
      auto feed = [&](__m256i (&sums)[G][T], const int8_t* digits) __attribute__((always_inline)) {
        const __m256i x = spread(digits + t * K + 4 * k);
        #pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
          if constexpr (kVnni) {
            sums[g][t] = _mm256_dpbusd_epi32(sums[g][t], codes[g], x);
          } else {
            sums[g][t] = _mm256_add_epi16(sums[g][t], _mm256_maddubs_epi16(codes[g], x));
          }
        }
      };
      feed(dq, q);
      if constexpr (D == 2) feed(df, f);
    }
  }
}

// Groups of 8 output rows a whole tile of activation rows takes at once (each digit broadcast
// serves them all): with VNNI 2 (16 rows: 1.05-1.24x at 16 activation rows against 1; 3 and 4
// measured no better), without 1 (the registers).
constexpr int kGroups = kVnni ? 2 : 1;

// 256 dq + df (one digit: dq) as int32 lanes, times 2^shift, into out (or added to it).
template <int T, int G, int D>
inline void combine(__m256i (&dq)[G][T], __m256i (&df)[G][T], int shift, __m256i (&out)[G][T],
                    bool add) {
  #pragma GCC unroll 8
  for (int g = 0; g < G; g++) {
    #pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
      __m256i dot;
      if constexpr (D == 1) {
        dot = kVnni ? dq[g][t] : _mm256_madd_epi16(dq[g][t], _mm256_set1_epi16(1));
      } else if constexpr (kVnni) {
        dot = _mm256_add_epi32(_mm256_slli_epi32(dq[g][t], 8), df[g][t]);
      } else {
        dot = _mm256_add_epi32(_mm256_madd_epi16(dq[g][t], _mm256_set1_epi16(256)),
                               _mm256_madd_epi16(df[g][t], _mm256_set1_epi16(1)));
      }
      if (shift) dot = _mm256_slli_epi32(dot, shift);
      out[g][t] = add ? _mm256_add_epi32(out[g][t], dot) : dot;
    }
  }
}

struct Q4 {
  static constexpr int64_t kBlockBytes = 2 * 2 * kRows + 4 * 32;  // 160: 0.625 bytes a weight
  // Activation rows per unpacking of a block: 4 measured best with VNNI (8: 0.87-1.0x at 128
  // rows); without, as many as 16 vector registers hold.
  static constexpr int kTile = kVnni ? 4 : 3;
  static __m256 minimums(const uint8_t* block) { return halves(block + 2 * kRows); }
  template <int T, int G, int D>
  static void dots(const uint8_t* const (&blocks)[G], const int8_t* q, const int8_t* f,
                   int64_t K, __m256i (&out)[G][T]) {
    // Vector k of the 8 is stored vector k / 2's low (k even) or high nibbles.
    auto code = [&](int g, int k) {
      const __m256i c = _mm256_loadu_si256((const __m256i*)(blocks[g] + 4 * kRows + 32 * (k / 2)));
      return nibbles(c, k % 2);
    };
    __m256i dq[G][T], df[G][T];
    block_dots<T, G, D>(code, q, f, K, dq, df);
    combine<T, G, D>(dq, df, 0, out, false);
  }
};

struct Q8 {
  static constexpr int64_t kBlockBytes = 2 * kRows + 8 * 32;  // 272: 1.0625 bytes a weight
  static constexpr int kTile = kVnni ? 4 : 2;
  static __m256 minimums(const uint8_t* block) {
    return _mm256_mul_ps(halves(block), _mm256_set1_ps(-128.f));
  }
  template <int T, int G, int D>
  static void dots(const uint8_t* const (&blocks)[G], const int8_t* q, const int8_t* f,
                   int64_t K, __m256i (&out)[G][T]) {
    auto vector = [&](int g, int k) {
      return _mm256_loadu_si256((const __m256i*)(blocks[g] + 2 * kRows + 32 * k));
    };
    __m256i dq[G][T], df[G][T];
    if constexpr (kVnni) {  // vpdpbusd takes codes up to 255 whole
      block_dots<T, G, D>(vector, q, f, K, dq, df);
      combine<T, G, D>(dq, df, 0, out, false);
    } else {
      // vpmaddubsw's pair sums would saturate with codes over 127: the codes split into
      // nibbles, dot(u, .) = 16 dot(u >> 4, .) + dot(u & 15, .), the same integers as VNNI's.
      #pragma GCC unroll 2
      for (int high = 1; high >= 0; high--) {
        auto split = [&](int g, int k) { return nibbles(vector(g, k), high); };
        block_dots<T, G, D>(split, q, f, K, dq, df);
        combine<T, G, D>(dq, df, high ? 4 : 0, out, !high);
      }
    }
  }
};

// Output rows 8n .. 8(n + G) - 1 (those below N) of activation rows m .. m + T - 1: per block,
// the integer dot products scaled into one float vector a group and row (lane r: output row
// 8(n + g) + r), then the minimums' term; stored last.
template <class F, int T, int G, int D>
inline void tile(int64_t m, int64_t n, int64_t K, int64_t N, const int8_t* q, const int8_t* f,
                 const float* dx, const float* sx, const uint8_t* packed, float* out) {
  const int64_t B = K / kBlock;
  const uint8_t* blocks[G];
  #pragma GCC unroll 8
  for (int g = 0; g < G; g++) blocks[g] = packed + (n + g) * B * F::kBlockBytes;
  __m256 acc[G][T];
  #pragma GCC unroll 8
  for (int g = 0; g < G; g++)
    #pragma GCC unroll 8
    for (int t = 0; t < T; t++) acc[g][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; b++) {
    __m256i dot[G][T];
    F::template dots<T, G, D>(blocks, q + m * K + b * kBlock, f + m * K + b * kBlock, K, dot);
    #pragma GCC unroll 8
    for (int g = 0; g < G; g++) {
      const __m256 d = halves(blocks[g]), minimum = F::minimums(blocks[g]);
      #pragma GCC unroll 8
      for (int t = 0; t < T; t++) {
        const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(dx[(m + t) * B + b]));
        acc[g][t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot[g][t]), acc[g][t]);
        acc[g][t] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(sx[(m + t) * B + b]), acc[g][t]);
      }
      blocks[g] += F::kBlockBytes;
    }
  }
  #pragma GCC unroll 8
  for (int g = 0; g < G; g++) {
    const int64_t valid = std::min<int64_t>(kRows, N - kRows * (n + g));
    #pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
      float* row = out + (m + t) * N + kRows * (n + g);
      if (valid == kRows) {
        _mm256_storeu_ps(row, acc[g][t]);
      } else {
        alignas(32) float lanes[kRows];
        _mm256_store_ps(lanes, acc[g][t]);
        std::copy(lanes, lanes + valid, row);
      }
    }
  }
}

// Activation rows m .. M - 1 of groups n .. n + G - 1: tiles of F::kTile rows, then one tile
// of the rest (fewer rows).
template <class F, int G, int D, int T = F::kTile>
inline void tiles(int64_t m, int64_t M, int64_t n, int64_t K, int64_t N, const int8_t* q,
                  const int8_t* f, const float* dx, const float* sx, const uint8_t* packed,
                  float* out) {
  if constexpr (T == F::kTile)
    for (; m + T <= M; m += T) tile<F, T, G, D>(m, n, K, N, q, f, dx, sx, packed, out);
  if constexpr (T > 0) {
    if (M - m == T)
      tile<F, T, G, D>(m, n, K, N, q, f, dx, sx, packed, out);
    else
      tiles<F, G, D, T - 1>(m, M, n, K, N, q, f, dx, sx, packed, out);
  }
}

// Every output row of activation rows 0 .. M - 1, by units of G groups (the last group or
// groups one by one) shared out among PyTorch's threads, as the rest of the step uses them.
// OpenMP directly, not at::parallel_for: in its lambda the compiler kept the loop's state in
// memory (2x slower).
template <class F, int G, int D>
void rows_by_units(int64_t M, int64_t groups, int64_t K, int64_t N, const int8_t* q,
                   const int8_t* f, const float* dx, const float* sx, const uint8_t* packed,
                   float* out) {
  const int64_t units = (groups + G - 1) / G;
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t u = 0; u < units; u++) {
    const int64_t n = u * G;
    if (n + G <= groups)
      tiles<F, G, D>(0, M, n, K, N, q, f, dx, sx, packed, out);
    else
      for (int64_t g = n; g < groups; g++) tiles<F, 1, D>(0, M, g, K, N, q, f, dx, sx, packed, out);
  }
}

// out = x times the packed weights, with D activation digits. Whole tiles of rows share each
// digit broadcast among kGroups groups; fewer rows read the weights as one stream (two streams
// made one row's Q8 output layer 2x slower).
template <class F, int D>
void multiply(const at::Tensor& x, const at::Tensor& packed, int64_t N, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), groups = packed.size(0);
  const Rounded r = round_rows<D>(x);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  if (M >= F::kTile) {
    rows_by_units<F, kGroups, D>(M, groups, K, N, r.q, r.f, r.d, r.dsum, wp, op);
  } else {
    rows_by_units<F, 1, D>(M, groups, K, N, r.q, r.f, r.d, r.dsum, wp, op);
  }
}

// x [M, K] times the packed weights of N output rows ([ceil(N / 8), K / 32, kBlockBytes]),
// transposed: [M, N] float32.
template <class F>
at::Tensor matmul(const char* name, const at::Tensor& x_in, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x_in.dim() == 2 && packed.dim() == 3 && packed.scalar_type() == at::kByte,
              name, ": x [rows, columns] and packed weights [output rows / 8, blocks, ",
              F::kBlockBytes, "] uint8");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), B = K / kBlock;
  TORCH_CHECK(K % kBlock == 0 && packed.size(1) == B && packed.size(2) == F::kBlockBytes &&
                  packed.is_contiguous(),
              name, ": packed weights of ", packed.size(1), " blocks do not match activations of ",
              K, " columns");
  TORCH_CHECK(N >= 0 && (N + kRows - 1) / kRows == packed.size(0), name, ": ", N,
              " output rows do not match packed weights of ", packed.size(0), " groups of 8");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (activation_digits.load(std::memory_order_relaxed) == 1) {
    multiply<F, 1>(x, packed, N, out);
  } else {
    multiply<F, 2>(x, packed, N, out);
  }
  return out;
}

at::Tensor q4_mm(const at::Tensor& x, const at::Tensor& packed, int64_t rows) {
  return matmul<Q4>("q4_mm", x, packed, rows);
}

at::Tensor q8_mm(const at::Tensor& x, const at::Tensor& packed, int64_t rows) {
  return matmul<Q8>("q8_mm", x, packed, rows);
}

// The activation digits of every later call in the process (1 or 2).
void set_activation_digits(int64_t digits) {
  TORCH_CHECK(digits == 1 || digits == 2, "activation digits are 1 or 2, not ", digits);
  activation_digits.store((int)digits);
}

}  // namespace

TORCH_LIBRARY(textgen, m) {
  m.def("q4_mm(Tensor x, Tensor packed, int rows) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor packed, int rows) -> Tensor");
  m.def("set_activation_digits(int digits) -> ()", set_activation_digits);
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
