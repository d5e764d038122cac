"""A fused CPU kernel for TIES-style sign-consensus merging (ties, breadcrumbs_ties and della share the
combine step; the fast path uses it for magnitude top-k or no sparsification; float32, float64, bfloat16 and
float16: reduced-precision values are computed in float and rounded back exactly where the torch kernel rounds).

The chunked torch kernel in ``task_arithmetic.py`` needs about twenty elementwise passes per chunk; this one
does the whole per-element computation in one loop over the base and the task vectors, so a candidate costs
about one read of the sources and one write of the output. It computes exactly what the torch kernel computes,
in the same order and rounding (products before sums, sums left to right, no fused multiply-add:
``-ffp-contract=off``), so results stay bit-identical to mergekit's; tests compare the two paths bit for bit.

It is C++ compiled on first use (``evomerge/native.py``: a C++ compiler and ninja are needed; cached under
~/.cache/evomerge/kernels). Where it cannot be built, or with ``EVOMERGE_FUSED_KERNELS=0``, the torch kernel
is used: same results, slower.
"""

from __future__ import annotations

import torch

from evomerge import native
from evomerge.methods.sparsify import Threshold

MAX_MODELS = 8
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_SOURCE = r"""
#include <torch/extension.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

constexpr int64_t BLOCK = 512;  // elements per block: M + 3 small buffers stay in L1

// One block of elements: per model, the kept and weighted deltas p (hardshrink, tied elements put back, times
// the weight), then the sign election and the combine. Plain loops over arrays so the compiler vectorizes them
// (-O3, -fno-strict-aliasing for the integer views of the float buffers, -ffp-contract=off: no FMA).
template <typename T, typename Bits, int M>
static void combine(const T* base, const T* const* deltas, const T* lambdas, const bool* shrink,
                    const int64_t* const* extras, const int64_t* n_extras, const T* weights, const bool* scale,
                    bool normalize, bool clamp, T min_weight, bool use_lambda, T lambda, T* out, int64_t n) {
  alignas(64) T p[M][BLOCK];
  alignas(64) T total[BLOCK], mixed[BLOCK], div[BLOCK];
  alignas(64) Bits sign[BLOCK];
  const Bits sign_bit = Bits(1) << (sizeof(T) * 8 - 1);
  int64_t next_extra[M];
  for (int i = 0; i < M; ++i) next_extra[i] = 0;
  for (int64_t start = 0; start < n; start += BLOCK) {
    const int64_t len = n - start < BLOCK ? n - start : BLOCK;
    for (int i = 0; i < M; ++i) {
      const T* d = deltas[i] + start;
      T* row = p[i];
      if (shrink[i]) {
        const T l = lambdas[i];
        for (int64_t k = 0; k < len; ++k) {  // torch.hardshrink (NaN passes), branch-free so it vectorizes
          const T x = d[k];
          const bool inside = (x >= -l) & (x <= l);
          row[k] = inside ? T(0) : x;
        }
        // elements tied at the top-k cut that mergekit keeps (sorted positions): kept whatever the threshold
        while (next_extra[i] < n_extras[i] && extras[i][next_extra[i]] < start + len) {
          const int64_t k = extras[i][next_extra[i]++] - start;
          row[k] = d[k];
        }
      } else {
        for (int64_t k = 0; k < len; ++k) row[k] = d[k];
      }
      if (scale[i]) {
        const T w = weights[i];
        for (int64_t k = 0; k < len; ++k) row[k] = row[k] * w;
      }
    }
    for (int64_t k = 0; k < len; ++k) total[k] = p[0][k];
    for (int i = 1; i < M; ++i)
      for (int64_t k = 0; k < len; ++k) total[k] = total[k] + p[i][k];
    const Bits* total_bits = reinterpret_cast<const Bits*>(total);
    for (int64_t k = 0; k < len; ++k) sign[k] = total_bits[k] & sign_bit;
    // part i agrees with the majority sign s where part_i * s > 0: relu of the sign-flipped part keeps exactly
    // the agreeing magnitudes (torch's relu: clamp_min(x, 0), NaN and -0 pass through)
    for (int i = 0; i < M; ++i) {
      Bits* bits = reinterpret_cast<Bits*>(p[i]);
      for (int64_t k = 0; k < len; ++k) bits[k] ^= sign[k];
      T* row = p[i];
      for (int64_t k = 0; k < len; ++k) row[k] = row[k] < T(0) ? T(0) : row[k];
    }
    for (int64_t k = 0; k < len; ++k) mixed[k] = p[0][k];
    for (int i = 1; i < M; ++i)
      for (int64_t k = 0; k < len; ++k) mixed[k] = mixed[k] + p[i][k];
    if (normalize) {
      const T w0 = weights[0];
      for (int64_t k = 0; k < len; ++k) div[k] = (p[0][k] > T(0) ? T(1) : T(0)) * w0;
      for (int i = 1; i < M; ++i) {
        const T w = weights[i];
        for (int64_t k = 0; k < len; ++k) div[k] = div[k] + (p[i][k] > T(0) ? T(1) : T(0)) * w;
      }
      if (clamp) {
        for (int64_t k = 0; k < len; ++k) div[k] = div[k] < min_weight ? min_weight : div[k];
      } else {
        for (int64_t k = 0; k < len; ++k) div[k] = div[k] == T(0) ? T(1) : div[k];
      }
      for (int64_t k = 0; k < len; ++k) mixed[k] = mixed[k] / div[k];
    }
    if (use_lambda)
      for (int64_t k = 0; k < len; ++k) mixed[k] = mixed[k] * lambda;
    Bits* mixed_bits = reinterpret_cast<Bits*>(mixed);
    for (int64_t k = 0; k < len; ++k) mixed_bits[k] ^= sign[k];
    const T* b = base + start;
    T* o = out + start;
    for (int64_t k = 0; k < len; ++k) o[k] = mixed[k] + b[k];
  }
}

template <typename T, typename Bits>
static void dispatch(torch::Tensor base, std::vector<torch::Tensor> deltas, std::vector<double> lambdas,
                     std::vector<torch::Tensor> extras, std::vector<double> weights, bool prescaled,
                     bool normalize, bool clamp, double min_weight, bool use_lambda, double lambda,
                     torch::Tensor out) {
  const int m = deltas.size();
  std::vector<const T*> ptrs(m);
  std::vector<const int64_t*> extra_ptrs(m);
  std::vector<int64_t> n_extras(m);
  std::vector<T> lam(m), w(m);
  bool shrink[8], scale[8];
  for (int i = 0; i < m; ++i) {
    ptrs[i] = deltas[i].data_ptr<T>();
    extra_ptrs[i] = extras[i].data_ptr<int64_t>();
    n_extras[i] = extras[i].numel();
    shrink[i] = lambdas[i] >= 0;
    lam[i] = static_cast<T>(lambdas[i]);
    w[i] = static_cast<T>(weights[i]);
    scale[i] = !prescaled && weights[i] != 1.0;   // x * 1 == x
  }
  const T* b = base.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t n = base.numel();
  const T mw = static_cast<T>(min_weight), lb = static_cast<T>(lambda);
#define EVOMERGE_CASE(K) case K: combine<T, Bits, K>(b, ptrs.data(), lam.data(), shrink, extra_ptrs.data(), \
    n_extras.data(), w.data(), scale, normalize, clamp, mw, use_lambda, lb, o, n); break;
  switch (m) {
    EVOMERGE_CASE(1) EVOMERGE_CASE(2) EVOMERGE_CASE(3) EVOMERGE_CASE(4)
    EVOMERGE_CASE(5) EVOMERGE_CASE(6) EVOMERGE_CASE(7) EVOMERGE_CASE(8)
    default: TORCH_CHECK(false, "fused ties: 1 to 8 models");
  }
#undef EVOMERGE_CASE
}

// bfloat16 / float16: values are loaded into float blocks and rounded back to the storage type exactly where
// the torch kernel rounds (its products and quotients are bf16/fp16 ops: computed in float, rounded once; its
// sums over the models accumulate in float32 and are rounded once), so results stay bit-identical to it.
struct BF16 {
  static inline float load(uint16_t h) { uint32_t b = uint32_t(h) << 16; float f; std::memcpy(&f, &b, 4); return f; }
  static inline uint16_t store(float f) {  // round to nearest even; NaN -> 0xffff as torch's vectorized cast
    uint32_t b; std::memcpy(&b, &f, 4);
    const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    return f != f ? uint16_t(0xFFFF) : uint16_t(r);
  }
};
struct F16 {
  static inline float load(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
  static inline uint16_t store(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
};

template <typename F, int M>
static void combine_reduced(const uint16_t* base, const uint16_t* const* deltas, const float* lambdas,
                            const bool* shrink, const int64_t* const* extras, const int64_t* n_extras,
                            const float* weights, const bool* scale, bool normalize, bool clamp, float min_weight,
                            bool use_lambda, float lambda, uint16_t* out, int64_t n) {
  alignas(64) float p[M][BLOCK];
  alignas(64) float total[BLOCK], mixed[BLOCK], div[BLOCK];
  alignas(64) uint32_t sign[BLOCK];
  alignas(64) uint16_t tmp[BLOCK];
  int64_t next_extra[M];
  for (int i = 0; i < M; ++i) next_extra[i] = 0;
  auto round = [&](float* v, int64_t len) {  // v = float(storage(v)), in place
    for (int64_t k = 0; k < len; ++k) tmp[k] = F::store(v[k]);
    for (int64_t k = 0; k < len; ++k) v[k] = F::load(tmp[k]);
  };
  for (int64_t start = 0; start < n; start += BLOCK) {
    const int64_t len = n - start < BLOCK ? n - start : BLOCK;
    for (int i = 0; i < M; ++i) {
      const uint16_t* d = deltas[i] + start;
      float* row = p[i];
      for (int64_t k = 0; k < len; ++k) row[k] = F::load(d[k]);
      if (shrink[i]) {
        const float l = lambdas[i];
        for (int64_t k = 0; k < len; ++k) {
          const float x = row[k];
          const bool inside = (x >= -l) & (x <= l);
          row[k] = inside ? 0.0f : x;
        }
        while (next_extra[i] < n_extras[i] && extras[i][next_extra[i]] < start + len) {
          const int64_t k = extras[i][next_extra[i]++] - start;
          row[k] = F::load(d[k]);
        }
      }
      if (scale[i]) {  // a reduced-precision product: exact in float, rounded once
        const float w = weights[i];
        for (int64_t k = 0; k < len; ++k) row[k] = row[k] * w;
        round(row, len);
      }
    }
    for (int64_t k = 0; k < len; ++k) total[k] = p[0][k];
    for (int i = 1; i < M; ++i)
      for (int64_t k = 0; k < len; ++k) total[k] = total[k] + p[i][k];
    // the sign of the rounded sum is the float sum's (rounding keeps the sign)
    const uint32_t* total_bits = reinterpret_cast<const uint32_t*>(total);
    for (int64_t k = 0; k < len; ++k) sign[k] = total_bits[k] & 0x80000000u;
    for (int i = 0; i < M; ++i) {
      uint32_t* bits = reinterpret_cast<uint32_t*>(p[i]);
      for (int64_t k = 0; k < len; ++k) bits[k] ^= sign[k];
      float* row = p[i];
      for (int64_t k = 0; k < len; ++k) row[k] = row[k] < 0.0f ? 0.0f : row[k];
    }
    for (int64_t k = 0; k < len; ++k) mixed[k] = p[0][k];
    for (int i = 1; i < M; ++i)
      for (int64_t k = 0; k < len; ++k) mixed[k] = mixed[k] + p[i][k];
    round(mixed, len);
    if (normalize) {
      const float w0 = weights[0];
      for (int64_t k = 0; k < len; ++k) div[k] = (p[0][k] > 0.0f ? 1.0f : 0.0f) * w0;
      for (int i = 1; i < M; ++i) {
        const float w = weights[i];
        for (int64_t k = 0; k < len; ++k) div[k] = div[k] + (p[i][k] > 0.0f ? 1.0f : 0.0f) * w;
      }
      round(div, len);
      if (clamp) {
        for (int64_t k = 0; k < len; ++k) div[k] = div[k] < min_weight ? min_weight : div[k];
      } else {
        for (int64_t k = 0; k < len; ++k) div[k] = div[k] == 0.0f ? 1.0f : div[k];
      }
      for (int64_t k = 0; k < len; ++k) mixed[k] = mixed[k] / div[k];
      round(mixed, len);
    }
    if (use_lambda) {
      for (int64_t k = 0; k < len; ++k) mixed[k] = mixed[k] * lambda;
      round(mixed, len);
    }
    uint32_t* mixed_bits = reinterpret_cast<uint32_t*>(mixed);
    for (int64_t k = 0; k < len; ++k) mixed_bits[k] ^= sign[k];
    const uint16_t* b = base + start;
    for (int64_t k = 0; k < len; ++k) mixed[k] = mixed[k] + F::load(b[k]);
    uint16_t* o = out + start;
    for (int64_t k = 0; k < len; ++k) o[k] = F::store(mixed[k]);
  }
}

template <typename F>
static void dispatch_reduced(torch::Tensor base, std::vector<torch::Tensor> deltas, std::vector<double> lambdas,
                             std::vector<torch::Tensor> extras, std::vector<double> weights, bool prescaled,
                             bool normalize, bool clamp, double min_weight, bool use_lambda, double lambda,
                             torch::Tensor out) {
  const int m = deltas.size();
  std::vector<const uint16_t*> ptrs(m);
  std::vector<const int64_t*> extra_ptrs(m);
  std::vector<int64_t> n_extras(m);
  std::vector<float> lam(m), w(m);
  bool shrink[8], scale[8];
  for (int i = 0; i < m; ++i) {
    ptrs[i] = reinterpret_cast<const uint16_t*>(deltas[i].data_ptr());
    extra_ptrs[i] = extras[i].data_ptr<int64_t>();
    n_extras[i] = extras[i].numel();
    shrink[i] = lambdas[i] >= 0;
    lam[i] = static_cast<float>(lambdas[i]);
    w[i] = static_cast<float>(weights[i]);
    scale[i] = !prescaled && weights[i] != 1.0;
  }
  const uint16_t* b = reinterpret_cast<const uint16_t*>(base.data_ptr());
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t n = base.numel();
  const float mw = static_cast<float>(min_weight), lb = static_cast<float>(lambda);
#define EVOMERGE_CASE(K) case K: combine_reduced<F, K>(b, ptrs.data(), lam.data(), shrink, extra_ptrs.data(), \
    n_extras.data(), w.data(), scale, normalize, clamp, mw, use_lambda, lb, o, n); break;
  switch (m) {
    EVOMERGE_CASE(1) EVOMERGE_CASE(2) EVOMERGE_CASE(3) EVOMERGE_CASE(4)
    EVOMERGE_CASE(5) EVOMERGE_CASE(6) EVOMERGE_CASE(7) EVOMERGE_CASE(8)
    default: TORCH_CHECK(false, "fused ties: 1 to 8 models");
  }
#undef EVOMERGE_CASE
}

void ties_combine(torch::Tensor base, std::vector<torch::Tensor> deltas, std::vector<double> lambdas,
                  std::vector<torch::Tensor> extras, std::vector<double> weights, bool prescaled,
                  bool normalize, bool clamp, double min_weight, bool use_lambda, double lambda,
                  torch::Tensor out) {
  if (base.scalar_type() == torch::kFloat32) {
    dispatch<float, uint32_t>(base, deltas, lambdas, extras, weights, prescaled, normalize, clamp, min_weight,
                              use_lambda, lambda, out);
  } else if (base.scalar_type() == torch::kBFloat16) {
    dispatch_reduced<BF16>(base, deltas, lambdas, extras, weights, prescaled, normalize, clamp, min_weight,
                           use_lambda, lambda, out);
  } else if (base.scalar_type() == torch::kHalf) {
    dispatch_reduced<F16>(base, deltas, lambdas, extras, weights, prescaled, normalize, clamp, min_weight,
                          use_lambda, lambda, out);
  } else {
    TORCH_CHECK(base.scalar_type() == torch::kFloat64, "fused ties: float32, float64, bfloat16 or float16");
    dispatch<double, uint64_t>(base, deltas, lambdas, extras, weights, prescaled, normalize, clamp, min_weight,
                               use_lambda, lambda, out);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ties_combine", &ties_combine, py::call_guard<py::gil_scoped_release>());
}
"""

def _kernel() -> native.Kernel:
    """Never a fused multiply-add (-ffp-contract=off): results must equal the torch kernel's."""
    tag, simd = native.simd_flags()
    flags = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing", "-fno-trapping-math", *simd]
    return native.Kernel(f"evomerge_fused_ties_{tag}", _SOURCE, flags, "the fused TIES kernel")


_KERNEL = _kernel()


def available() -> bool:
    """Whether the fused C++ TIES kernel is built (or can be) on this machine."""
    return _KERNEL.available()


def ties_combine(base: torch.Tensor, deltas: list[torch.Tensor], thresholds: list[Threshold | None] | None,
                 weights: list[float], normalize: bool, lambda_: float, out: torch.Tensor) -> bool:
    """out = base + lambda * TIES-combine(weight_i * kept(delta_i)); False if not handled here.

    ``thresholds[i]`` (a magnitude top-k, ``sparsify.magnitude_threshold``) selects what model i keeps, None
    keeps everything; ``thresholds=None`` means the deltas are already sparsified AND weighted (the weights then
    only enter the divisor). ``weights`` are already rounded to the tensor's dtype. Handles contiguous CPU
    float32/float64/bfloat16/float16 tensors and 1..8 models; the caller falls back to the torch kernel otherwise.
    """
    if (base.device.type != "cpu" or base.dtype not in FUSED_DTYPES
            or not 1 <= len(deltas) <= MAX_MODELS or not out.is_contiguous() or not base.is_contiguous()
            or not all(d.is_contiguous() and d.dtype == base.dtype for d in deltas)
            or any(t is not None and t.keep is not None for t in thresholds or ())):
        return False
    module = _KERNEL.load()
    if module is None:
        return False
    prescaled = thresholds is None
    cuts: list[Threshold | None] = [None] * len(deltas) if thresholds is None else thresholds
    none = torch.empty(0, dtype=torch.int64)
    lambdas = [-1.0 if t is None else t.shrink_lambda(base.dtype) for t in cuts]
    extras = [none if t is None or t.extra is None else t.extra.to(torch.int64).contiguous() for t in cuts]
    positive = min(weights) > 0
    module.ties_combine(base, list(deltas), lambdas, extras, [float(w) for w in weights], prescaled,
                        bool(normalize), positive, float(min(weights)) if positive else 0.0, lambda_ != 1,
                        float(lambda_), out)
    return True
