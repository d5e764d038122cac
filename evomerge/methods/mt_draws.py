"""DARE / DELLA random draws: torch's CPU Mersenne Twister stream, generated about 5 times faster.

mergekit's random masks are ``torch.bernoulli(p)`` on CPU, which for each element draws one 32-bit number from
the generator's MT19937 engine and keeps the element where ``(x & 0xFFFFFF) * 2**-24 < p`` (torch's
``uniform_real_distribution<float>``: the low 24 bits; ``sparsify.py`` explains why that is the same stream as
``torch.rand(float32) < p``). torch produces those numbers one element at a time behind a mutex (``cpu_serial_kernel``),
about 2.3 ns per element: for a bf16 DARE-TIES candidate, three quarters of its time. This kernel reads the
generator's own engine state (``CPUGeneratorImpl::engine``), runs the same recurrence (Matsumoto & Nishimura 1998,
torch's ``at::mt19937``: the state twist, then the tempering of each word) 624 words at a time in loops the
compiler vectorizes, and writes the generator's state back, so a draw here is indistinguishable from torch's own,
before and after: the same numbers, the generator advanced by exactly as many draws.

Two entry points: ``keep_mask_into`` writes the 0/1 mask of ``u < p`` straight into a float tensor (DARE: one
threshold per tensor, compared as integers: ``u < p`` exactly when the 24-bit ``k < ceil(p * 2**24)``), and
``uniform_into`` writes the float32 draws themselves (DELLA: a probability per element).

Exactness: tests/test_mt_draws.py compares both against ``torch.rand`` / ``torch.bernoulli`` on the same seeds
(lengths that split the 624-word blocks anywhere, generators already advanced), and the merges' differential
tests against mergekit run through it. Where the kernel cannot be built, or with ``EVOMERGE_FUSED_KERNELS=0``,
callers use ``torch.rand``: same results, slower. Only CPU generators and float32-precision draws go through
here (float64 draws use two engine outputs per element; GPU generators are Philox).
"""

from __future__ import annotations

import math

import torch

from evomerge import native

MASK_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/MT19937RNGEngine.h>
#include <cstdint>
#include <cstring>
#include <mutex>

constexpr int N = at::MERSENNE_STATE_N;   // 624 words of state
constexpr int M = at::MERSENNE_STATE_M;   // 397

// at::mt19937_engine::next_state, split into loops without loop-carried dependencies at vector width: the
// first N - M words read words ahead of them (not yet rewritten), the rest read words M - N behind (rewritten
// earlier in this pass, 227 words back).
static inline uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & at::UMASK) | (v & at::LMASK)) >> 1) ^ ((v & 1u) ? at::MATRIX_A : 0u);
}

static void next_state(uint32_t* s) {
  int j = 0;
#pragma GCC ivdep
  for (; j < N - M; ++j) s[j] = s[j + M] ^ twist(s[j], s[j + 1]);
#pragma GCC ivdep
  for (; j < N - 1; ++j) s[j] = s[j + M - N] ^ twist(s[j], s[j + 1]);
  s[N - 1] = s[M - 1] ^ twist(s[N - 1], s[0]);
}

static inline uint32_t temper(uint32_t y) {
  y ^= (y >> 11);
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= (y >> 18);
  return y;
}

// Emit n draws from the engine state d as torch's operator() would (one 32-bit word per draw), handing each
// 24-bit value k and its index to sink(i0, k[], count) in runs of up to N.
template <typename Sink>
static void draw(at::mt19937_data_pod& d, int64_t n, Sink sink) {
  uint32_t* s = d.state_.data();
  alignas(64) uint32_t k[N];
  int64_t i = 0;
  while (i < n) {
    // torch: if (--left == 0) next_state(); then y = state[next++]. `left` counts down to the twist.
    if (d.left_ == 1) { next_state(s); d.left_ = N + 1; d.next_ = 0; }
    const int64_t avail = d.left_ - 1;           // words left in this block: state[next, next + avail)
    const int64_t run = n - i < avail ? n - i : avail;
    const uint32_t* src = s + d.next_;
#pragma GCC ivdep
    for (int64_t t = 0; t < run; ++t) k[t] = temper(src[t]) & 0xFFFFFFu;
    sink(i, k, run);
    d.next_ += static_cast<uint32_t>(run);
    d.left_ -= static_cast<int>(run);
    i += run;
  }
}

template <typename Fn>
static void with_engine(const at::Generator& g, Fn fn) {
  auto* gen = at::check_generator<at::CPUGeneratorImpl>(g);
  std::lock_guard<std::mutex> lock(gen->mutex_);
  at::mt19937 engine = gen->engine();
  at::mt19937_data_pod d = engine.data();
  fn(d);
  engine.set_data(d);
  gen->set_engine(engine);
}

template <typename T>
static void mask_as(const at::Generator& g, torch::Tensor& out, int64_t threshold, T one) {
  T* o = reinterpret_cast<T*>(out.data_ptr());
  const int64_t n = out.numel();
  // k < 2^24 always, so a threshold above it keeps everything. Branch-free (a random compare mispredicts).
  const uint32_t K = static_cast<uint32_t>(threshold < 0x1000000 ? threshold : 0x1000000);
  with_engine(g, [o, n, K, one](at::mt19937_data_pod& d) {
    draw(d, n, [o, K, one](int64_t i0, const uint32_t* k, int64_t count) {
      T* dst = o + i0;
#pragma GCC ivdep
      for (int64_t t = 0; t < count; ++t) dst[t] = one & static_cast<T>(T(0) - static_cast<T>(k[t] < K));
    });
  });
}

// out (contiguous, float32/float64/bfloat16/float16) = 1 where the draw's 24-bit value k < threshold, else 0.
void keep_mask(at::Generator g, torch::Tensor out, int64_t threshold) {
  TORCH_CHECK(out.is_contiguous() && out.device().is_cpu(), "mt draws: a contiguous CPU tensor");
  switch (out.scalar_type()) {
    case torch::kFloat32: mask_as<uint32_t>(g, out, threshold, 0x3F800000u); break;
    case torch::kFloat64: mask_as<uint64_t>(g, out, threshold, 0x3FF0000000000000ull); break;
    case torch::kBFloat16: mask_as<uint16_t>(g, out, threshold, uint16_t(0x3F80)); break;
    case torch::kHalf: mask_as<uint16_t>(g, out, threshold, uint16_t(0x3C00)); break;
    default: TORCH_CHECK(false, "mt draws: mask dtype float32, float64, bfloat16 or float16");
  }
}

// out (contiguous float32) = the draws k * 2^-24, exactly torch.rand's float32 values.
void uniform(at::Generator g, torch::Tensor out) {
  TORCH_CHECK(out.is_contiguous() && out.device().is_cpu() && out.scalar_type() == torch::kFloat32,
              "mt draws: a contiguous float32 CPU tensor");
  float* o = out.data_ptr<float>();
  with_engine(g, [&](at::mt19937_data_pod& d) {
    draw(d, out.numel(), [&](int64_t i0, const uint32_t* k, int64_t count) {
      float* dst = o + i0;
#pragma GCC ivdep
      for (int64_t t = 0; t < count; ++t) dst[t] = static_cast<float>(k[t]) * 5.9604644775390625e-08f;
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("keep_mask", &keep_mask, py::call_guard<py::gil_scoped_release>());
  m.def("uniform", &uniform, py::call_guard<py::gil_scoped_release>());
}
"""


def _kernel() -> native.Kernel:
    tag, simd = native.simd_flags(avx512=True)
    return native.Kernel(f"evomerge_mt_draws_{tag}", _SOURCE, ["-O3", *simd], "the random-draw kernel")


_KERNEL = _kernel()


def available() -> bool:
    """Whether the C++ draw kernel is built (or can be) on this machine."""
    return _KERNEL.available()


def _usable(generator: torch.Generator | None, out: torch.Tensor) -> bool:
    return (generator is not None and generator.device.type == "cpu" and out.device.type == "cpu"
            and out.is_contiguous())


def threshold_24(p: float) -> int:
    """The integer K with ``k * 2**-24 < p`` exactly when ``k < K`` for every 24-bit k (``p`` a float32 value,
    so ``p * 2**24`` is exact in double)."""
    return max(0, math.ceil(p * 16777216.0))


def keep_mask_into(mask: torch.Tensor, p: float, generator: torch.Generator | None) -> bool:
    """mask (contiguous CPU, float32/float64/bfloat16/float16) = 1.0 where ``torch.rand(float32) < p``, drawn
    from ``generator`` (advanced by ``mask.numel()`` draws); False (nothing drawn) where this kernel does not
    apply: no generator (torch's default one is shared), a GPU tensor, or no kernel.

    Args:
        mask: the output, any shape; overwritten.
        p: the keep probability, a float32 value (DARE's density rounded to the draw's dtype by the caller).
        generator: a CPU ``torch.Generator``.
    """
    if not _usable(generator, mask) or mask.dtype not in MASK_DTYPES:
        return False
    module = _KERNEL.load()
    if module is None:
        return False
    module.keep_mask(generator, mask, threshold_24(p))
    return True


def uniform_into(out: torch.Tensor, generator: torch.Generator | None) -> bool:
    """out (contiguous CPU float32) = ``torch.rand(out.shape, generator=generator)``'s values; False (nothing
    drawn) where this kernel does not apply."""
    if not _usable(generator, out) or out.dtype != torch.float32:
        return False
    module = _KERNEL.load()
    if module is None:
        return False
    module.uniform(generator, out)
    return True
