"""A fused CPU kernel for TIES-style sign-consensus merging (ties, breadcrumbs_ties and della share the
combine step; the fast path uses it for magnitude top-k or no sparsification; float32, float64, bfloat16 and
float16: reduced-precision values are computed in float and rounded back exactly where the torch kernel rounds).

The chunked torch kernel in ``task_arithmetic.py`` needs about twenty elementwise passes per chunk; this one
reads the base and the task vectors once and writes the output once: per block of 512 elements it keeps each
model's delta (hardshrink by the top-k threshold) in an L1-sized buffer, then one loop does the weighting, sign
election and combine with every intermediate in registers, 8 floats (4 doubles) at a time in GCC vector types
(16 and 8 where torch runs AVX-512 kernels: a build of its own).
It computes exactly what the torch kernel computes, in the same order and rounding (products before sums, sums
left to right, no fused multiply-add: ``-ffp-contract=off``), so results stay bit-identical to mergekit's;
tests compare the paths bit for bit (tests/test_ties_kernel.py, test_bf16_fast_path.py, test_fused_threads.py).

The elements tied at the top-k cut that mergekit's sort keeps arrive unsorted (a slice of the sort order) and
are marked in a bitmap (one bit per element), so a candidate sorts nothing. Blocks are split over torch's
intra-op threads (``at::parallel_for``; every element's result is independent of the split). The engine and
``evomerge merge`` call it from their own pools with one torch thread each, where it runs on the calling thread.

float16 loads, rounds and stores with the F16C conversion instructions (IEEE round to nearest even, subnormals
exact; NaN made c10's quiet NaN first), W lanes at a time like bfloat16: 0.49 ns per element of a 2-model merge
on one core where the one-lane c10 conversions took 18.3 ns (AVX-512 build; 0.85 ns with AVX2). Builds for CPUs
without AVX2 keep the one-lane float16 code.

Cost (experiments/benchmarks/ties_order.py, scale_merge.py; docs/MEMORY.md): compute-bound, not memory-bound, in
bf16: about 0.5-0.9 ns per element of a 2-model ties merge on one core with 16-float vectors (AVX-512 builds),
0.9-1.5 ns with 8 (AVX2): 6-10x the time to copy the tensor once.

It is C++ compiled on first use (``evomerge/native.py``: a C++ compiler and ninja are needed; cached under
~/.cache/evomerge/kernels). Where it cannot be built, or with ``EVOMERGE_FUSED_KERNELS=0``, the torch kernel
is used: same results, slower.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge import native
from evomerge.methods.sparsify import Threshold

MAX_MODELS = 8
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

constexpr int64_t BLOCK = 512;  // elements per block: M float buffers of it stay in L1 (a multiple of 8)
constexpr int64_t GRAIN = 128;  // blocks per task of torch's intra-op pool (64k elements)

template <typename To, typename From>
static inline To bit_cast(From x) { To y; std::memcpy(&y, &x, sizeof(To)); return y; }

// GCC/Clang vector types: element-wise IEEE arithmetic, 8 floats or 4 doubles at a time (two SSE registers
// each where AVX2 is not enabled), so the per-element loop below is vectorized whatever the auto-vectorizer does.
// EVOMERGE_VEC_BYTES: 32 (AVX2 / SSE) or 64 (AVX-512 builds): 8 or 16 floats per vector.
#ifndef EVOMERGE_VEC_BYTES
#define EVOMERGE_VEC_BYTES 32
#endif
typedef float v8f __attribute__((vector_size(EVOMERGE_VEC_BYTES)));
typedef uint32_t v8u __attribute__((vector_size(EVOMERGE_VEC_BYTES)));
typedef uint16_t v8h __attribute__((vector_size(EVOMERGE_VEC_BYTES / 2)));
typedef double v4d __attribute__((vector_size(EVOMERGE_VEC_BYTES)));
typedef uint64_t v4u __attribute__((vector_size(EVOMERGE_VEC_BYTES)));

// Storage types: S is stored, C computes, V is W lanes of C (VB: their bits). Reduced-precision values are
// computed in float and rounded back (round) exactly where the torch kernel rounds: its products and quotients
// are bf16/fp16 ops (computed in float, rounded once) and its sums over the models accumulate in float32 and
// are rounded once.
template <typename S_, typename Bits_, typename V_, typename VB_>
struct Plain {  // float32 / float64: computed in the storage type, nothing to round
  using S = S_; using C = S_; using Bits = Bits_; using V = V_; using VB = VB_;
  static constexpr int W = EVOMERGE_VEC_BYTES / sizeof(S_);
  static inline C load(S x) { return x; }
  static inline S store(C x) { return x; }
  static inline C round(C x) { return x; }
  static inline V round(V x) { return x; }
  static inline V vload(const S* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
  static inline void vstore(S* p, V v) { std::memcpy(p, &v, sizeof(V)); }
};
using FP32 = Plain<float, uint32_t, v8f, v8u>;
using FP64 = Plain<double, uint64_t, v4d, v4u>;
struct BF16 {
  using S = uint16_t; using C = float; using Bits = uint32_t; using V = v8f; using VB = v8u;
  static constexpr int W = EVOMERGE_VEC_BYTES / 4;
  static inline float load(uint16_t h) { return bit_cast<float>(uint32_t(h) << 16); }
  static inline uint16_t store(float f) { return uint16_t(bit_cast<uint32_t>(round(f)) >> 16); }
  static inline float round(float f) {  // float(bf16(f)): round to nearest even; NaN -> 0xffff as torch's cast
    const uint32_t b = bit_cast<uint32_t>(f);
    const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
    return bit_cast<float>(f != f ? 0xFFFF0000u : r);
  }
  static inline V round(V f) {
    const VB b = bit_cast<VB>(f);
    const VB r = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
    return bit_cast<V>(f != f ? VB{} + 0xFFFF0000u : r);
  }
  static inline V vload(const S* p) {
    v8h h; std::memcpy(&h, p, sizeof(h));
    return bit_cast<V>(VB(__builtin_convertvector(h, VB) << 16));
  }
  static inline void vstore(S* p, V f) {  // the rounding of round(), the high half kept
    const v8h h = __builtin_convertvector(bit_cast<VB>(round(f)) >> 16, v8h);
    std::memcpy(p, &h, sizeof(h));
  }
};
#if defined(__F16C__)
#include <immintrin.h>
// float16 with the F16C conversions (IEEE, round to nearest even, subnormals exact), W lanes at a time. NaN
// is made c10's quiet NaN first (sign | 0x7E00: c10::detail::fp16_ieee_from_fp32_value), so every bit equals
// c10's scalar conversions, which the torch kernel uses.
struct F16 {
  using S = uint16_t; using C = float; using Bits = uint32_t; using V = v8f; using VB = v8u;
  static constexpr int W = EVOMERGE_VEC_BYTES / 4;
#if EVOMERGE_VEC_BYTES == 64
  using H = __m256i; using R = __m512;
  static inline R widen(H h) { return _mm512_cvtph_ps(h); }
  static inline H narrow(R f) { return _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
#else
  using H = __m128i; using R = __m256;
  static inline R widen(H h) { return _mm256_cvtph_ps(h); }
  static inline H narrow(R f) { return _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
#endif
  static inline float load(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
  static inline uint16_t store(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
  static inline float round(float f) { return load(store(f)); }
  static inline V canonical(V f) {  // NaN lanes -> sign | 0x7FC00000 (converts to sign | 0x7E00)
    const VB sign = bit_cast<VB>(f) & 0x80000000u;
    return f != f ? bit_cast<V>(VB(sign | 0x7FC00000u)) : f;
  }
  static inline H to_half(V f) { return narrow(bit_cast<R>(canonical(f))); }
  static inline V round(V f) { return bit_cast<V>(widen(to_half(f))); }
  static inline V vload(const S* p) { H h; std::memcpy(&h, p, sizeof(H)); return bit_cast<V>(widen(h)); }
  static inline void vstore(S* p, V f) { const H h = to_half(f); std::memcpy(p, &h, sizeof(H)); }
};
#else
struct F16 {  // one lane: c10's conversions are scalar code (no F16C in this build)
  using S = uint16_t; using C = float; using Bits = uint32_t; using V = float; using VB = uint32_t;
  static constexpr int W = 1;
  static inline float load(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
  static inline uint16_t store(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
  static inline float round(float f) { return load(store(f)); }
  static inline V vload(const S* p) { return load(*p); }
  static inline void vstore(S* p, V v) { *p = store(v); }
};
#endif

// One call's arguments, per model where indexed by model (at most 8 models).
template <typename F>
struct Args {
  using S = typename F::S; using C = typename F::C;
  const S* base; const S* deltas[8]; S* out; int64_t n;
  bool shrink[8]; C lambdas[8];          // hardshrink: keep x where |x| > lambdas[i]
  const uint64_t* extra[8];              // bitmap of tied elements kept whatever the threshold (or null)
  bool scale[8]; C weights[8];           // weighted here (else the deltas come weighted)
  bool rescale[8]; C factors[8];         // delta * factor, rounded, before the weight (DARE's L1 rescale)
  bool normalize, clamp, use_lambda; C min_weight, lambda;
};

// The per-element parameters, copied out of Args: with -fno-strict-aliasing any store could alias `a`, and
// the loops would reload every parameter.
template <typename C, int M>
struct Scalars {
  C w[M], lambdas[M], factors[M]; bool scale[M], shrink[M], rescale[M]; bool normalize, clamp, use_lambda;
  C min_weight, lambda;
};

// W elements at once (V: W lanes of C, or C itself for one lane): from the kept deltas q (overwritten) and the
// base, base + lambda * the agreeing weighted deltas' (normalized) sum, in the compute type before the final
// store. Operation for operation what the torch kernel does in its dtype (x * 1 == x: a weight of 1 is skipped).
template <typename F, typename V, typename VB, int M>
static inline V lanes(V* q, V base, const Scalars<typename F::C, M>& c) {
  using Bits = typename F::Bits;
  constexpr Bits SIGN = Bits(1) << (sizeof(Bits) * 8 - 1);
  const V zero = V{}, one = zero + 1;
  for (int i = 0; i < M; ++i)
    if (c.scale[i]) q[i] = F::round(q[i] * c.w[i]);  // a reduced-precision product: exact in float, rounded once
  V total = q[0];
  for (int i = 1; i < M; ++i) total = total + q[i];
  // the majority sign is the sign bit of the sum (the rounded sum's: rounding keeps the sign). Part i agrees
  // where part_i * s > 0: relu of the sign-flipped part keeps exactly the agreeing magnitudes (torch's relu:
  // clamp_min(x, 0), NaN and -0 pass through)
  const VB sign = bit_cast<VB>(total) & SIGN;
  for (int i = 0; i < M; ++i) {
    const V flipped = bit_cast<V>(VB(bit_cast<VB>(q[i]) ^ sign));
    q[i] = flipped < zero ? zero : flipped;
  }
  V mixed = q[0];
  for (int i = 1; i < M; ++i) mixed = mixed + q[i];
  mixed = F::round(mixed);
  if (c.normalize) {
    V div = (q[0] > zero ? one : zero) * c.w[0];
    for (int i = 1; i < M; ++i) div = div + (q[i] > zero ? one : zero) * c.w[i];
    div = F::round(div);
    if (c.clamp) {
      const V floor = zero + c.min_weight;
      div = div < floor ? floor : div;
    } else {
      div = div == zero ? one : div;
    }
    mixed = F::round(mixed / div);
  }
  if (c.use_lambda) mixed = F::round(mixed * c.lambda);
  mixed = bit_cast<V>(VB(bit_cast<VB>(mixed) ^ sign));
  return mixed + base;
}

// row[0, len) = model i's delta d in the compute type, W lanes at a time, branch-free. With `shrink`: what its
// threshold keeps, torch.hardshrink (|x| > lambda; NaN passes), and with Marked also the elements whose bit is
// set in `bits` (the tied elements mergekit keeps; a bitmap from element 0 of d). With `rescale`: times `factor`,
// rounded (a product in the dtype: DARE's L1 rescale).
template <typename F, bool Marked>
static inline void widen(const typename F::S* d, const uint8_t* bits, bool shrink, typename F::C lambda,
                         bool rescale, typename F::C factor, typename F::C* row, int64_t len) {
  using C = typename F::C; using V = typename F::V; using VB = typename F::VB; using Bits = typename F::Bits;
  int64_t k = 0;
  if constexpr (F::W > 1) {
    const V zero = V{}, l = zero + lambda;
    VB lane{};
    for (int j = 0; j < F::W; ++j) lane[j] = Bits(1) << j;
    for (; k + F::W <= len; k += F::W) {
      const V x = F::vload(d + k);
      VB drop = shrink ? VB((x >= -l) & (x <= l)) : VB{};
      if constexpr (Marked) {  // these lanes' bits: W <= 16 bits from bit k (the bitmap is padded)
        uint32_t word;
        std::memcpy(&word, bits + (k >> 3), sizeof(word));
        drop = drop & VB((lane & Bits(word >> (k & 7))) == 0);
      }
      V r = drop ? zero : x;
      if (rescale) r = F::round(r * factor);
      std::memcpy(row + k, &r, sizeof(V));
    }
  }
  for (; k < len; ++k) {
    const C x = F::load(d[k]);
    bool drop = shrink & (x >= -lambda) & (x <= lambda);
    if constexpr (Marked) drop = drop & (((bits[k >> 3] >> (k & 7)) & 1) == 0);
    const C r = drop ? C(0) : x;
    row[k] = rescale ? F::round(r * factor) : r;
  }
}

// Blocks [b0, b1) of the output. Per block: per model, the kept deltas in a small buffer (L1), then ONE loop
// does the weighting, the sign election and the combine with every intermediate in registers, W elements at a
// time (M is a compile-time constant: the loops over models unroll; -ffp-contract=off: no FMA, so every
// operation rounds as torch's does).
template <typename F, int M>
static void combine(const Args<F>& a, int64_t b0, int64_t b1) {
  using C = typename F::C; using S = typename F::S;
  alignas(64) C p[M][BLOCK];
  // the parameters as locals: with -fno-strict-aliasing any store could alias `a` and force reloads
  Scalars<C, M> c;
  const S* deltas[M];
  const uint8_t* extra[M];
  for (int i = 0; i < M; ++i) {
    c.w[i] = a.weights[i]; c.scale[i] = a.scale[i]; c.lambdas[i] = a.lambdas[i]; c.shrink[i] = a.shrink[i];
    c.rescale[i] = a.rescale[i]; c.factors[i] = a.factors[i];
    deltas[i] = a.deltas[i]; extra[i] = reinterpret_cast<const uint8_t*>(a.extra[i]);
  }
  c.normalize = a.normalize; c.clamp = a.clamp; c.use_lambda = a.use_lambda;
  c.min_weight = a.min_weight; c.lambda = a.lambda;
  const int64_t n = a.n;
  const S* base = a.base;
  S* out = a.out;
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t start = blk * BLOCK;
    const int64_t len = n - start < BLOCK ? n - start : BLOCK;
    for (int i = 0; i < M; ++i) {
      const S* d = deltas[i] + start;
      C* row = p[i];
      if (c.shrink[i] && extra[i] != nullptr) {
        widen<F, true>(d, extra[i] + start / 8, true, c.lambdas[i], c.rescale[i], c.factors[i], row, len);
      } else {
        widen<F, false>(d, nullptr, c.shrink[i], c.lambdas[i], c.rescale[i], c.factors[i], row, len);
      }
    }
    const S* b = base + start;
    S* o = out + start;
    int64_t k = 0;
    for (; k + F::W <= len; k += F::W) {
      typename F::V q[M];
      for (int i = 0; i < M; ++i) std::memcpy(&q[i], &p[i][k], sizeof(q[i]));
      F::vstore(o + k, lanes<F, typename F::V, typename F::VB, M>(q, F::vload(b + k), c));
    }
    for (; k < len; ++k) {  // the ragged end, one lane at a time (the same code)
      C q[M];
      for (int i = 0; i < M; ++i) q[i] = p[i][k];
      o[k] = F::store(lanes<F, C, typename F::Bits, M>(q, F::load(b[k]), c));
    }
  }
}

// A bitmap (one bit per element) of the positions in idx (int32 or int64, any order, in [0, n)).
static torch::Tensor mark(const torch::Tensor& idx, int64_t n) {
  auto bitmap = torch::zeros({(n + 63) / 64 + 1}, torch::dtype(torch::kInt64));
  uint64_t* words = reinterpret_cast<uint64_t*>(bitmap.data_ptr<int64_t>());
  const int64_t m = idx.numel();
  if (idx.scalar_type() == torch::kInt32) {
    const int32_t* p = idx.data_ptr<int32_t>();
    for (int64_t j = 0; j < m; ++j) words[p[j] >> 6] |= uint64_t(1) << (p[j] & 63);
  } else {
    const int64_t* p = idx.data_ptr<int64_t>();
    for (int64_t j = 0; j < m; ++j) words[p[j] >> 6] |= uint64_t(1) << (p[j] & 63);
  }
  return bitmap;
}

template <typename F>
static void dispatch(torch::Tensor base, std::vector<torch::Tensor> deltas, std::vector<double> lambdas,
                     std::vector<torch::Tensor> extras, std::vector<double> weights,
                     std::vector<double> factors, bool prescaled, bool normalize, bool clamp, double min_weight,
                     bool use_lambda, double lambda, torch::Tensor out) {
  using S = typename F::S; using C = typename F::C;
  const int m = deltas.size();
  TORCH_CHECK(1 <= m && m <= 8, "fused ties: 1 to 8 models");
  Args<F> a;
  a.base = reinterpret_cast<const S*>(base.data_ptr());
  a.out = reinterpret_cast<S*>(out.data_ptr());
  a.n = base.numel();
  std::vector<torch::Tensor> bitmaps(m);
  for (int i = 0; i < m; ++i) {
    a.deltas[i] = reinterpret_cast<const S*>(deltas[i].data_ptr());
    a.shrink[i] = lambdas[i] >= 0;
    a.lambdas[i] = static_cast<C>(lambdas[i]);
    if (extras[i].numel() > 0) {
      TORCH_CHECK(extras[i].min().item<int64_t>() >= 0 && extras[i].max().item<int64_t>() < a.n,
                  "fused ties: tied positions out of range");
      bitmaps[i] = mark(extras[i], a.n);
      a.extra[i] = reinterpret_cast<const uint64_t*>(bitmaps[i].data_ptr<int64_t>());
    } else {
      a.extra[i] = nullptr;
    }
    a.weights[i] = static_cast<C>(weights[i]);
    a.scale[i] = !prescaled && weights[i] != 1.0;  // x * 1 == x
    a.rescale[i] = factors[i] != 1.0;
    a.factors[i] = static_cast<C>(factors[i]);
  }
  a.normalize = normalize; a.clamp = clamp; a.use_lambda = use_lambda;
  a.min_weight = static_cast<C>(min_weight); a.lambda = static_cast<C>(lambda);
  const int64_t blocks = (a.n + BLOCK - 1) / BLOCK;
#define EVOMERGE_CASE(K) case K: at::parallel_for(0, blocks, GRAIN, [&](int64_t b0, int64_t b1) { \
    combine<F, K>(a, b0, b1); }); break;
  switch (m) {
    EVOMERGE_CASE(1) EVOMERGE_CASE(2) EVOMERGE_CASE(3) EVOMERGE_CASE(4)
    EVOMERGE_CASE(5) EVOMERGE_CASE(6) EVOMERGE_CASE(7) EVOMERGE_CASE(8)
    default: TORCH_CHECK(false, "fused ties: 1 to 8 models");
  }
#undef EVOMERGE_CASE
}

void ties_combine(torch::Tensor base, std::vector<torch::Tensor> deltas, std::vector<double> lambdas,
                  std::vector<torch::Tensor> extras, std::vector<double> weights,
                  std::vector<double> factors, bool prescaled, bool normalize, bool clamp, double min_weight,
                  bool use_lambda, double lambda, torch::Tensor out) {
  const auto type = base.scalar_type();
  if (type == torch::kFloat32) {
    dispatch<FP32>(base, deltas, lambdas, extras, weights, factors, prescaled, normalize, clamp, min_weight, use_lambda,
                   lambda, out);
  } else if (type == torch::kBFloat16) {
    dispatch<BF16>(base, deltas, lambdas, extras, weights, factors, prescaled, normalize, clamp, min_weight, use_lambda,
                   lambda, out);
  } else if (type == torch::kHalf) {
    dispatch<F16>(base, deltas, lambdas, extras, weights, factors, prescaled, normalize, clamp, min_weight, use_lambda,
                  lambda, out);
  } else {
    TORCH_CHECK(type == torch::kFloat64, "fused ties: float32, float64, bfloat16 or float16");
    dispatch<FP64>(base, deltas, lambdas, extras, weights, factors, prescaled, normalize, clamp, min_weight, use_lambda,
                   lambda, out);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ties_combine", &ties_combine, py::call_guard<py::gil_scoped_release>());
}
"""

def _kernel() -> native.Kernel:
    """Never a fused multiply-add (-ffp-contract=off): results must equal the torch kernel's. Where torch runs
    AVX-512 kernels, 16 floats per vector (elementwise IEEE operations: the same results at any width)."""
    tag, simd = native.simd_flags(avx512=True)
    if tag == "avx512":
        simd = [*simd, "-DEVOMERGE_VEC_BYTES=64"]
    if tag != "base":
        simd = [*simd, "-mf16c"]  # every AVX2 CPU has F16C: float16 vectorized (its conversion instructions)
    flags = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing", "-fno-trapping-math", *simd]
    return native.Kernel(f"evomerge_fused_ties_{tag}", _SOURCE, flags, "the fused TIES kernel")


_KERNEL = _kernel()


def available() -> bool:
    """Whether the fused C++ TIES kernel is built (or can be) on this machine."""
    return _KERNEL.available()


def accepts(base: torch.Tensor, deltas: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
    """Whether ``ties_combine`` will handle these tensors (and the kernel is built): contiguous CPU
    float32/float64/bfloat16/float16 tensors of one dtype, 1..8 models."""
    return (base.device.type == "cpu" and base.dtype in FUSED_DTYPES and 1 <= len(deltas) <= MAX_MODELS
            and out.is_contiguous() and base.is_contiguous()
            and all(d.is_contiguous() and d.dtype == base.dtype for d in deltas) and _KERNEL.load() is not None)


def ties_combine(base: torch.Tensor, deltas: list[torch.Tensor], thresholds: list[Threshold | None] | None,
                 weights: list[float], normalize: bool, lambda_: float, out: torch.Tensor,
                 factors: Sequence[float] | None = None) -> bool:
    """out = base + lambda * TIES-combine(weight_i * kept(delta_i)); False if not handled here.

    ``thresholds[i]`` (a magnitude top-k, ``sparsify.magnitude_threshold``; its tied positions in any order)
    selects what model i keeps, None keeps everything; ``thresholds=None`` means the deltas are already
    sparsified AND weighted (the weights then only enter the divisor), unless ``factors`` is given: then they
    are sparsified but neither rescaled nor weighted, and model i's part is ``round(round(delta_i * factors[i])
    * weight_i)`` (DARE's deferred L1 rescale, ``sparsify.sparsify_into(defer_rescale=True)``; the same
    products and roundings as rescaling and weighting the rows in torch). ``weights`` and ``factors`` are
    values of the tensor's dtype. Handles what ``accepts`` accepts; the caller falls back to the torch kernel
    otherwise. Runs on torch's intra-op threads (one where the caller set one).
    """
    if not accepts(base, deltas, out) or any(t is not None and t.keep is not None for t in thresholds or ()):
        return False
    module = _KERNEL.load()
    assert factors is None or thresholds is None, "factors apply to sparsified rows only"
    prescaled = thresholds is None and factors is None
    cuts: list[Threshold | None] = [None] * len(deltas) if thresholds is None else thresholds
    none = torch.empty(0, dtype=torch.int64)
    lambdas = [-1.0 if t is None else t.shrink_lambda(base.dtype) for t in cuts]
    extras = [none if t is None or t.extra is None else t.extra.contiguous() for t in cuts]
    scales = [1.0] * len(deltas) if factors is None else [float(f) for f in factors]
    positive = min(weights) > 0
    module.ties_combine(base, list(deltas), lambdas, extras, [float(w) for w in weights], scales, prescaled,
                        bool(normalize), positive, float(min(weights)) if positive else 0.0, lambda_ != 1,
                        float(lambda_), out)
    return True
