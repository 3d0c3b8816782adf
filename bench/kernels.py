"""A candidate matmul for AVX2 machines, measured against the int8 kernel textgen runs there.

On AVX2 (Zen 3 and older) PyTorch's int4 kernel is no faster than its int8 one, so textgen
compiles int8 weights: 1.0 byte per weight against llama.cpp's 0.56-0.63 (Q4_0/Q4_1), and its
matmuls convert every weight to float32 for one multiply-add each. llama.cpp instead rounds the
activations to int8 in blocks of 32 and multiplies 4-bit codes by them with integer dot products
(``vpmaddubsw``: 32 products in one instruction). This script builds that kernel (Q4_1 weights:
per block of 32 a scale and a minimum; activations: per block of 32 an int8 scale) as a C++
extension, checks it against the float product of the same rounded weights, and times it and
``_weight_int8pack_mm`` on the seeds' matmul shapes at 1 and 16 rows. It is not used by textgen:
it tells how much such a kernel would give before it is built into the compiled decoder.

Usage: python bench/kernels.py [--out bench/out/kernels.json]   (needs a C++ compiler, AVX2)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from textgen.models.quantize import INT4_GROUP, int4_groups

REPO = Path(__file__).resolve().parent.parent
BLOCK = INT4_GROUP  # activations are rounded in the weights' blocks

# out[m, n] = sum over blocks b of d[n,b] * dx[m,b] * dot(codes[n,b], q[m,b]) + min[n,b] * sx[m,b]
# (codes 0-15, q int8; sx = dx * sum(q)), rows in groups of 4 so that each block's weights are
# unpacked once for 4 rows; output rows split between the OpenMP threads.
SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>

static inline float sum_lanes(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

torch::Tensor q4q8_mm(torch::Tensor q, torch::Tensor dx, torch::Tensor sx,
                      torch::Tensor codes, torch::Tensor d, torch::Tensor mins) {
  const int64_t M = q.size(0), K = q.size(1), N = codes.size(0), B = K / 32;
  auto out = torch::empty({M, N}, torch::kFloat32);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* dxp = dx.data_ptr<float>();
  const float* sxp = sx.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* dp = d.data_ptr<float>();
  const float* mp = mins.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int R = 4;
  #pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n++) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int64_t m0 = 0; m0 < M; m0 += R) {
      const int rows = (int)std::min<int64_t>(R, M - m0);
      __m256 acc[R];
      float by_min[R];
      for (int r = 0; r < R; r++) { acc[r] = _mm256_setzero_ps(); by_min[r] = 0.f; }
      for (int64_t b = 0; b < B; b++) {
        __m128i packed = _mm_loadu_si128((const __m128i*)(cp + (n * B + b) * 16));
        __m256i c = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
        const float scale = dp[n * B + b], minimum = mp[n * B + b];
        for (int r = 0; r < rows; r++) {
          const int64_t m = m0 + r;
          __m256i x = _mm256_loadu_si256((const __m256i*)(qp + m * K + b * 32));
          __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), ones);
          acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale * dxp[m * B + b]),
                                   _mm256_cvtepi32_ps(dot), acc[r]);
          by_min[r] += minimum * sxp[m * B + b];
        }
      }
      for (int r = 0; r < rows; r++) op[(m0 + r) * N + n] = sum_lanes(acc[r]) + by_min[r];
    }
  }
  return out;
}
"""

# (name, output rows N, input columns K): GPT-2's fused q/k/v, its MLP and output layer, the
# embedded model's MLP and output layer.
SHAPES = [
    ("gpt2 qkv", 2304, 768),
    ("gpt2 mlp up", 3072, 768),
    ("gpt2 mlp down", 768, 3072),
    ("gpt2 output", 50257, 768),
    ("smollm2 mlp up", 1536, 576),
    ("smollm2 output", 49152, 576),
]


def build() -> Callable[..., torch.Tensor]:
    from torch.utils.cpp_extension import load_inline

    module = load_inline(
        "textgen_bench_q4q8",
        cpp_sources=SOURCE,
        functions=["q4q8_mm"],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )
    return module.q4q8_mm


def quantized_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 codes, per-block scales and per-block sums (scale x sum of codes) of ``x``."""
    rows, columns = x.shape
    blocks = x.reshape(rows, columns // BLOCK, BLOCK)
    scale = blocks.abs().amax(-1).clamp(min=1e-12) / 127
    codes = torch.round(blocks / scale[..., None]).clamp(-127, 127).to(torch.int8)
    sums = scale * codes.float().sum(-1)
    return codes.reshape(rows, columns), scale.contiguous(), sums.contiguous()


def quantized_weights(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q4_1, rounded as textgen's int4 weights are: packed codes (column j low nibble, j + 16
    high), scales, minimums, and the float weights they stand for."""
    codes, scale, low = int4_groups(w)
    dequantized = (codes * scale[..., None] + low[..., None]).reshape(w.shape)
    codes = codes.to(torch.uint8)
    packed = (codes[..., :16] | (codes[..., 16:] << 4)).contiguous()
    return packed, scale.contiguous(), low.contiguous(), dequantized


def best_ms(fn: Callable[..., object], *args: object, calls: int = 100, rounds: int = 7) -> float:
    """The fastest of ``rounds`` averages of ``calls`` calls of ``fn(*args)``, in ms."""
    for _ in range(10):
        fn(*args)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    q4q8 = build()
    results = []
    for name, n, k in SHAPES:
        packed, scale, minimum, dequantized = quantized_weights(torch.randn(n, k) * 0.02)
        weight_bytes = packed.nbytes + scale.nbytes + minimum.nbytes  # float32 scales here
        int8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        int8_scale = torch.rand(n).to(torch.bfloat16)
        for rows in (1, 16):
            x = torch.randn(rows, k)
            codes, x_scale, x_sums = quantized_activations(x)
            got = q4q8(codes, x_scale, x_sums, packed, scale, minimum)
            want = x @ dequantized.t()
            error = float((got - want).norm() / want.norm())
            assert error < 0.02, f"{name}: relative error {error}"
            candidate = best_ms(q4q8, codes, x_scale, x_sums, packed, scale, minimum)
            rounding = best_ms(quantized_activations, x, calls=50)
            int8pack = torch.ops.aten._weight_int8pack_mm
            baseline = best_ms(int8pack, x.to(torch.bfloat16), int8, int8_scale)
            result = {
                "matmul": name,
                "rows": rows,
                "n": n,
                "k": k,
                "q4q8_ms": round(candidate, 4),
                "q4q8_gmac_s": round(rows * n * k / candidate / 1e6, 1),
                "q4q8_weight_gb_s": round(weight_bytes / candidate / 1e6, 1),
                "activation_rounding_eager_ms": round(rounding, 4),
                "int8pack_ms": round(baseline, 4),
                "int8pack_gmac_s": round(rows * n * k / baseline / 1e6, 1),
                "speedup": round(baseline / candidate, 2),
                "relative_error": float(f"{error:.2e}"),
            }
            results.append(result)
            print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{platform.machine()}, {platform.processor()}", "results": results}
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
