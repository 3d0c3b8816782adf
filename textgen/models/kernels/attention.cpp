// Batch-invariant attention over a KV cache for textgen's compiled decoders on x86-64 CPUs with
// AVX2 and FMA (textgen/models/blockwise.py builds it with blocks.cpp into one library;
// decoders/base.py ``attend`` calls it), over a KV cache of float32 or float16 (the compiled
// decoders': half the bytes to read, which is what a step's attention costs at 16 rows; each
// value widened to float32 exactly as it is loaded). Each query row of each head is computed on
// its own, with the same operations in the same order whatever else the call holds:
// - its score with column c: the dot product of query and key in 8 lanes over the head's
//   dimensions, summed by a fixed tree, times the scale; columns the mask hides are skipped;
// - its weights: exp(score - the largest score), 8 columns at a time by one polynomial per lane
//   (a column's weight does not depend on its lane), hidden columns 0;
// - its output: the weighted sum of the value rows, column by column in order (8 lanes over the
//   dimensions), divided by the sum of the weights, also added column by column in order.
// So a row's result does not depend on the other rows, on how many query rows (tokens) the step
// has, on the thread that computes it, or on hidden columns before its own (a row's weights of
// exactly 0 add nothing): the same text alone, in a batch, or after a prefix-cache hit. The
// matmuls PyTorch's attention is made of need padded queries for that (9 times the work for a
// decode step of a model with one query head per key/value head; bench/RESULTS.md).

#include <ATen/Parallel.h>
#include <omp.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// exp of 8 floats, lane by lane (Cephes' single-precision polynomial, relative error ~2e-7);
// below -88.37 it is 0.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  const __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  // 2^n from the exponent bits (n >= -127: 2^-127's bits are those of 0).
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

inline float tree_sum(__m256 v) {  // ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7))
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

// One query row against columns [0, C) of one key/value head: out [V * 8] floats. ``scores``:
// room for C rounded up to 8 floats. V: the head's dimensions / 8 (0: ``lanes`` at run time).
template <int V, class E>
void attend_row(const float* query, const E* keys, const E* values, int64_t stride,
                const bool* mask, int64_t C, float scale, int lanes, float* scores, float* out) {
  const int vectors = V ? V : lanes;
  constexpr float kHidden = -std::numeric_limits<float>::infinity();
  __m256 q[V ? V : 32];
#pragma GCC unroll 16
  for (int i = 0; i < vectors; i++) q[i] = _mm256_loadu_ps(query + 8 * i);
  float top = kHidden;
  for (int64_t c = 0; c < C; c++) {
    if (!mask[c]) {
      scores[c] = kHidden;
      continue;
    }
    const E* key = keys + c * stride;
    __m256 acc = _mm256_mul_ps(q[0], load8(key));
#pragma GCC unroll 16
    for (int i = 1; i < vectors; i++) acc = _mm256_fmadd_ps(q[i], load8(key + 8 * i), acc);
    const float score = tree_sum(acc) * scale;
    scores[c] = score;
    top = std::max(top, score);
  }
  __m256 o[V ? V : 32];
#pragma GCC unroll 16
  for (int i = 0; i < vectors; i++) o[i] = _mm256_setzero_ps();
  if (top == kHidden) {  // every column hidden
#pragma GCC unroll 16
    for (int i = 0; i < vectors; i++) _mm256_storeu_ps(out + 8 * i, o[i]);
    return;
  }
  const int64_t padded = (C + 7) / 8 * 8;
  std::fill(scores + C, scores + padded, kHidden);
  const __m256 largest = _mm256_set1_ps(top);
  for (int64_t c = 0; c < padded; c += 8) {
    const __m256 s = _mm256_loadu_ps(scores + c);
    const __m256 shown = _mm256_cmp_ps(s, _mm256_set1_ps(kHidden), _CMP_NEQ_OQ);
    _mm256_storeu_ps(scores + c, _mm256_and_ps(exp8(_mm256_sub_ps(s, largest)), shown));
  }
  float total = 0.f;
  for (int64_t c = 0; c < C; c++) {
    const float weight = scores[c];
    if (weight == 0.f) continue;
    total += weight;
    const __m256 w = _mm256_set1_ps(weight);
    const E* value = values + c * stride;
#pragma GCC unroll 16
    for (int i = 0; i < vectors; i++) o[i] = _mm256_fmadd_ps(w, load8(value + 8 * i), o[i]);
  }
  const __m256 sum = _mm256_set1_ps(total);
#pragma GCC unroll 16
  for (int i = 0; i < vectors; i++) _mm256_storeu_ps(out + 8 * i, _mm256_div_ps(o[i], sum));
}

// Every item (row, head, token) of attend's call, the cache's elements of type E.
template <class E>
void attend_items(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                  const at::Tensor& mask, double scale, at::Tensor& out) {
  const int64_t R = query.size(0), H = query.size(1), T = query.size(2), D = query.size(3);
  const int64_t KVH = keys.size(1), C = mask.size(3);
  const float* qp = query.data_ptr<float>();
  const E* kp = keys.data_ptr<E>();
  const E* vp = values.data_ptr<E>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / KVH, items = R * H * T;
  const int64_t row_stride = keys.stride(0), head_stride = keys.stride(1), stride = keys.stride(2);
  const int64_t q_row = query.stride(0), q_head = query.stride(1), q_token = query.stride(2);
  const int lanes = (int)(D / 8);
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads) if (items > 1)
  {
    // Each thread's scores, kept for its next call (OpenMP's threads stay).
    thread_local std::vector<float> scores;
    if ((int64_t)scores.size() < (C + 7) / 8 * 8) scores.resize((C + 7) / 8 * 8);
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < items; item++) {
      const int64_t r = item / (H * T), h = item / T % H, t = item % T;
      const int64_t head = r * row_stride + (h / group) * head_stride;
      const float* q = qp + r * q_row + h * q_head + t * q_token;
      const bool* m = mp + (r * T + t) * C;
      float* o = op + (r * T + t) * H * D + h * D;
      auto run = [&](auto row) {
        row(q, kp + head, vp + head, stride, m, C, (float)scale, lanes, scores.data(), o);
      };
      switch (lanes) {
        case 8: run(attend_row<8, E>); break;
        case 10: run(attend_row<10, E>); break;
        case 16: run(attend_row<16, E>); break;
        default: run(attend_row<0, E>);
      }
    }
  }
}

// query [R, H, T, D]; keys and values [R, KVH, capacity, D] (the cache's buffers, float32 or
// float16, D contiguous); mask [R, 1, T, C] (C <= capacity, true: attended); out [R, T, H * D]
// float32.
at::Tensor attend(const at::Tensor& query_in, const at::Tensor& keys, const at::Tensor& values,
                  const at::Tensor& mask_in, double scale) {
  TORCH_CHECK(query_in.dim() == 4 && keys.dim() == 4 && values.dim() == 4 && mask_in.dim() == 4,
              "attend: query [rows, heads, tokens, dim], keys and values [rows, kv heads, "
              "columns, dim], mask [rows, 1, tokens, columns]");
  // The compiled decoders' query is a view of the projection ([R, T, H, D] transposed): read
  // in place when each head's dimensions are contiguous.
  const at::Tensor query = query_in.scalar_type() == at::kFloat && query_in.stride(3) == 1
                               ? query_in
                               : query_in.to(at::kFloat).contiguous();
  const int64_t R = query.size(0), H = query.size(1), T = query.size(2), D = query.size(3);
  const int64_t KVH = keys.size(1), C = mask_in.size(3);
  const auto type = keys.scalar_type();
  TORCH_CHECK((type == at::kFloat || type == at::kHalf) && values.scalar_type() == type &&
                  keys.sizes() == values.sizes() && keys.strides() == values.strides() &&
                  keys.size(0) == R && keys.size(3) == D && keys.stride(3) == 1 &&
                  C <= keys.size(2) && KVH > 0 && H % KVH == 0,
              "attend: keys and values [", R, ", kv heads dividing ", H, ", at least ", C, ", ", D,
              "] both float32 or both float16, with contiguous rows");
  TORCH_CHECK(D % 8 == 0 && D <= 256, "attend: head dimensions ", D, " not a multiple of 8 up to 256");
  const at::Tensor mask = mask_in.to(at::kBool).expand({R, 1, T, C}).contiguous();
  at::Tensor out = at::empty({R, T, H * D}, query.options());
  if (out.numel() == 0) return out;
  if (type == at::kHalf)
    attend_items<at::Half>(query, keys, values, mask, scale, out);
  else
    attend_items<float>(query, keys, values, mask, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(textgen, m) {
  m.def("attend(Tensor query, Tensor keys, Tensor values, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(textgen, CPU, m) { m.impl("attend", attend); }

// The entry point compiled decoders call directly (Inductor's custom_ops_to_c_shims).
extern "C" AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_attend(
    AtenTensorHandle query, AtenTensorHandle keys, AtenTensorHandle values, AtenTensorHandle mask,
    double scale, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    at::Tensor out = attend(*tensor_handle_to_tensor_pointer(query),
                            *tensor_handle_to_tensor_pointer(keys),
                            *tensor_handle_to_tensor_pointer(values),
                            *tensor_handle_to_tensor_pointer(mask), scale);
    *ret = torch::aot_inductor::new_tensor_handle(std::move(out));
  });
}
