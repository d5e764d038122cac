"""Attention of each sequence's newest token over its own cached keys/values (the decoding step's attention).

The slot decoder (``generation.py``) keeps sequence b's keys/values in columns ``[start_b, hi]`` of
preallocated buffers ``[rows, kv heads, columns, head dim]``. Columns left of ``start_b`` are padding: they hold
other sequences' columns. SDPA over the shared window ``[lo, hi]`` with a mask reads that padding too. In a
typical evaluation batch that is a third of the key/value reads, and decoding a small model on CPU is bound by
those reads.

The C++ kernel reads each sequence's own columns only. It handles the query heads that share a key/value
head (GQA) together, so each key and value is read once. It computes softmax(q.k * scale) . v per query head in
float32 with its own order of operations. It is not bit-identical to SDPA: logits differ by about 1e-6, as they
do between two different paddings of the same batch. Tests compare its greedy answers with ``generate()``.

It runs on CPU, for float32, with one torch thread; the kernel is serial. On 2 cores, a version that split the
rows over threads was measured no faster than SDPA's parallel kernel at 2 threads: starting or waking a thread
cost as much as it saved. So with more threads SDPA runs. It also runs everywhere else (CUDA, other dtypes, no
C++ compiler, ``EVOMERGE_FUSED_KERNELS=0``): SDPA over ``[lo, hi]`` with a padding mask, the same call
transformers makes, with the same result bits.
"""

from __future__ import annotations

import torch

from evomerge import native

_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

constexpr int LANES = 16;  // partial sums of a dot product: one AVX-512 or two AVX2 registers

static inline float dot(const float* a, const float* b, int64_t n) {
  float part[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int l = 0; l < LANES; ++l) part[l] += a[i + l] * b[i + l];
  float sum = 0;
  for (int l = 0; l < LANES; ++l) sum += part[l];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// x[i] = exp(x[i]) for x[i] <= 0: range reduction x = k ln2 + r (ln2 split in two for exactness), a degree-6
// polynomial for exp(r) (the Cephes coefficients) and 2^k from the exponent bits. About 1 ulp; written as a
// plain loop so the compiler vectorizes it. Below -87 (exp < 1.6e-38) the result is 0.
static inline void exp_nonpositive(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i];
    const bool underflow = v < -87.0f;
    v = underflow ? -87.0f : v;
    const float k = std::floor(v * 1.44269504088896341f + 0.5f);
    const float r = v - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (int32_t(k) + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &bits, sizeof(two_k));
    x[i] = underflow ? 0.0f : p * two_k;
  }
}

// query [B, H, G, D]; keys, values [R >= B, H, C, D]; starts [B]: row b attends to columns [starts[b], hi].
// out [B, H, G, D].
void decode_attention(torch::Tensor query, torch::Tensor keys, torch::Tensor values, torch::Tensor starts,
                      int64_t hi, double scale, torch::Tensor out) {
  TORCH_CHECK(query.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes(), "bad shapes");
  TORCH_CHECK(query.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
              values.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(query.is_contiguous() && keys.is_contiguous() && values.is_contiguous() && out.is_contiguous() &&
              starts.is_contiguous() && starts.scalar_type() == at::kLong, "contiguous inputs, int64 starts");
  const int64_t B = query.size(0), H = query.size(1), G = query.size(2), D = query.size(3);
  const int64_t C = keys.size(2);
  TORCH_CHECK(keys.size(0) >= B && keys.size(1) == H && keys.size(3) == D && starts.numel() == B &&
              out.sizes() == query.sizes() && hi >= 0 && hi < C, "inconsistent sizes");
  const int64_t* start = starts.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(start[b] >= 0 && start[b] <= hi, "start out of range");
  const float* q = query.data_ptr<float>();
  const float* k = keys.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float s = float(scale);
  pybind11::gil_scoped_release no_gil;
  std::vector<float> weights, acc(G * D), total(G);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t first = start[b], n = hi + 1 - first;
    weights.resize(G * n);
    for (int64_t h = 0; h < H; ++h) {
      const float* kb = k + ((b * H + h) * C + first) * D;
      const float* vb = v + ((b * H + h) * C + first) * D;
      const float* qb = q + (b * H + h) * G * D;
      for (int64_t j = 0; j < n; ++j)  // each key read once for the G query heads
        for (int64_t g = 0; g < G; ++g) weights[g * n + j] = dot(qb + g * D, kb + j * D, D) * s;
      for (int64_t g = 0; g < G; ++g) {
        float* w = weights.data() + g * n;
        const float top = *std::max_element(w, w + n);
        for (int64_t j = 0; j < n; ++j) w[j] -= top;
        exp_nonpositive(w, n);
        float sum = 0;
        for (int64_t j = 0; j < n; ++j) sum += w[j];
        total[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < n; ++j) {  // each value read once for the G query heads
        const float* vj = vb + j * D;
        for (int64_t g = 0; g < G; ++g) {
          const float w = weights[g * n + j];
          float* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] += w * vj[d];
        }
      }
      float* ob = o + (b * H + h) * G * D;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) ob[g * D + d] = acc[g * D + d] / total[g];
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "attention of one query token per row over its own columns");
}
"""


def _kernel() -> native.Kernel:
    tag, simd = native.simd_flags()
    flags = ["-O3", "-fno-strict-aliasing", "-fno-trapping-math", *simd]
    if simd:
        flags += ["-mfma", "-ffp-contract=fast"]
    return native.Kernel(f"evomerge_decode_attention_{tag}", _SOURCE, flags, "the decode attention kernel")


_KERNEL = _kernel()


def available() -> bool:
    """Whether the C++ decode-attention kernel is built (or can be) on this machine."""
    return _KERNEL.available()


class DecodeWindow:
    """One decoding step's attention window: row b sees columns ``[starts[b], hi]`` (``lo`` = min of starts).

    Built once per step and shared by every layer (the padding mask of the SDPA path is made once)."""

    def __init__(self, starts: torch.Tensor, lo: int, hi: int) -> None:
        self.starts, self.lo, self.hi = starts, lo, hi
        self._visible: torch.Tensor | None = None

    def visible(self) -> torch.Tensor:
        """``[rows, hi - lo + 1]`` bool: the columns of ``[lo, hi]`` each row sees (its own, from its start on)."""
        if self._visible is None:
            columns = torch.arange(self.lo, self.hi + 1, device=self.starts.device)
            self._visible = columns[None, :] >= self.starts[:, None]
        return self._visible

    def use_kernel(self, query: torch.Tensor) -> bool:
        """Whether this query runs on the C++ kernel (CPU, float32, one torch thread)."""
        return (query.device.type == "cpu" and query.dtype == torch.float32 and torch.get_num_threads() == 1
                and _KERNEL.load() is not None)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """query ``[n, kv heads, group, dim]`` (the query heads of each key/value head as its rows); keys and
        values: whole buffers ``[rows >= n, kv heads, columns, dim]``. Returns ``[n, kv heads, group, dim]``."""
        n = query.shape[0]
        if self.use_kernel(query) and keys.is_contiguous() and values.is_contiguous():
            query = query.contiguous()
            out = torch.empty_like(query)
            _KERNEL.load().decode_attention(query, keys, values, self.starts, self.hi, float(scale), out)
            return out
        return torch.nn.functional.scaled_dot_product_attention(
            query, keys[:n, :, self.lo:self.hi + 1], values[:n, :, self.lo:self.hi + 1],
            attn_mask=self.visible()[:, None, None, :], scale=scale)
