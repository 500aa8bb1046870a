"""How fast one core can read weight rows scattered over a large tree: the ceiling under the cold
CMM walk (the rows a batch of tokens reaches deep in the tree are distinct, so each is a memory
read).

    .venv/bin/python benchmarks/row_gather.py        # ~1 min on 2 cores

Reads rows of 768 floats (the input rows of a BERT-base tree, every other 3 KB of a 512 MB buffer
on 2 MiB pages, as packed trees are laid out), and rows half as long (384 floats: the same rows'
bytes in bf16, or a MiniLM tree's), at random, each as the walk's dot product with an
input, with: no software prefetch; the whole row of the read `ahead` places later prefetched
(prefetcht2, as the walk does; prefetcht0 for comparison); only its first lines prefetched. Also
the buffer read front to back, whole nodes, where the hardware prefetchers stream. 1 and 2 threads.
Writes benchmarks/results/row_gather.jsonl (GB/s of rows read, ns per row per thread).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils import cpp_extension

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lazyneuron.bench import write  # noqa: E402
from lazyneuron.bench.records import environment  # noqa: E402
from lazyneuron.paths import cache_dir  # noqa: E402

OUT = Path(__file__).parent / "results"

SRC = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

static inline float dot(const float* x, const float* w, int n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int j = 0; j < n; j += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(w + j), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), _mm256_loadu_ps(w + j + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 16), _mm256_loadu_ps(w + j + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 24), _mm256_loadu_ps(w + j + 24), a3);
  }
  float t[8];
  _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}

// mode 0: no prefetch; 1: prefetcht2 of `lines` lines of the row `ahead` reads later; 2: the same
// with prefetcht0; 3: whole 6 KB nodes in order, one stream (the hardware prefetches). Returns ns per row per thread (best of 7).
double gather(int mode, int ahead, int lines, int threads, int d) {
  const size_t bytes = size_t(512) << 20;
  const int stride = 2 * d, steps = 4096;
  void* p = nullptr;
  if (posix_memalign(&p, 2 << 20, bytes)) return -1;
  madvise(p, bytes, MADV_HUGEPAGE);
  std::memset(p, 1, bytes);
  const float* W = static_cast<const float*>(p);
  const size_t rows = bytes / (stride * 4);
  std::vector<std::vector<size_t>> idx(threads);
  std::mt19937_64 g(1);
  for (int t = 0; t < threads; ++t)
    for (int i = 0; i < steps * 8; ++i) idx[t].push_back(mode == 3 ? (size_t(t) * steps * 8 + i) % rows : g() % rows);
  std::vector<float> x(stride, 0.5f);
  const int n = mode == 3 ? stride : d;  // in order: whole packed nodes, one contiguous stream
  double best = 1e30;
  float sink = 0;
  for (int rep = 0; rep < 7; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      const size_t* id = idx[omp_get_thread_num()].data() + (rep % 8) * steps;
      for (int i = 0; i < steps; ++i) {
        if ((mode == 1 || mode == 2) && i + ahead < steps) {
          const char* q = reinterpret_cast<const char*>(W + id[i + ahead] * stride);
          for (int o = 0; o < lines; ++o) {
            if (mode == 1) _mm_prefetch(q + o * 64, _MM_HINT_T2);
            else _mm_prefetch(q + o * 64, _MM_HINT_T0);
          }
        }
        sink += dot(x.data(), W + id[i] * stride, n);
      }
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::free(p);
  return best / steps * 1e9 + (sink == 1.2345f ? 1e-9 : 0.0);
}
"""


def main() -> None:
    build = cache_dir("kernels", "row_gather2")
    ext = cpp_extension.load_inline("lazyneuron_row_gather2", cpp_sources=SRC, functions=["gather"], build_directory=str(build),
                                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    env = environment()
    recs = []
    print(f"{'pattern':<48} {'row B':>6} {'threads':>7} {'ns/row':>7} {'GB/s':>6}")
    for d in (768, 384):
        full = d * 4 // 64  # lines per row
        cases = [("random, no prefetch", 0, 0, 0), ("random, whole row prefetched 8 ahead (t2)", 1, 8, full),
                 ("random, whole row prefetched 16 ahead (t2)", 1, 16, full), ("random, whole row prefetched 16 ahead (t0)", 2, 16, full),
                 ("random, first 4 lines prefetched 16 ahead (t2)", 1, 16, 4), ("in order, whole nodes, no prefetch", 3, 0, 0)]
        for threads in (1, 2):
            for name, mode, ahead, lines in cases:
                ns = ext.gather(mode, ahead, lines, threads, d)
                row = d * 4 * (2 if mode == 3 else 1)
                gbs = threads * row / ns
                print(f"{name:<48} {row:>6} {threads:>7} {ns:>7.0f} {gbs:>6.1f}", flush=True)
                recs.append({"benchmark": "row_gather", "pattern": name, "threads": threads, "row_bytes": row, "ns_per_row_per_thread": ns,
                             "gb_per_s": gbs, "device": env["device"], "git_sha": env["git_sha"], "torch": torch.__version__})
    write(recs, OUT / "row_gather.jsonl", append=False)


if __name__ == "__main__":
    main()
