// Memory placement shared by the extensions: a tensor copied onto transparent huge pages.
#pragma once
#include <torch/extension.h>

#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

// A copy of `t` in 2 MiB-aligned memory marked for transparent huge pages (Linux; a plain copy
// elsewhere). The runtime keeps its weights there (lazyneuron/runtime/memory.py): a decode step
// streams every weight once per token, 2-27% faster per kernel than from 4 KiB pages. A CMM walk
// reads rows scattered over a tree of tens of MB: with 4 KiB pages nearly every row is a TLB miss,
// with 2 MiB pages a 25 MB tree needs 13 TLB entries (BERT-base dims, 128 tokens, cold: 17-19%
// less time than the same walk on 4 KiB pages).
torch::Tensor hugepage_copy(torch::Tensor t) {
  TORCH_CHECK(t.device().is_cpu(), "hugepage_copy: a CPU tensor is needed");
  auto c = t.contiguous();
  const size_t bytes = static_cast<size_t>(c.numel()) * c.element_size();
  constexpr size_t kHuge = size_t(2) << 20;
#if defined(__unix__) || defined(__APPLE__)
  if (bytes >= kHuge) {
    const size_t alloc = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, alloc) == 0) {
#if defined(MADV_HUGEPAGE)
      madvise(p, alloc, MADV_HUGEPAGE);  // before the first touch: the copy below faults huge pages in
#endif
      std::memcpy(p, c.data_ptr(), bytes);
      return torch::from_blob(p, c.sizes(), [](void* q) { std::free(q); }, c.options());
    }
  }
#endif
  return c.clone();
}

// An uninitialised uint8 tensor of `bytes` (> 0) in 2 MiB-aligned memory marked for transparent
// huge pages, none of it touched: its pages fault in (as huge pages where the OS has them) as it is
// written, so a caller copying buffers in one by one never holds the old and the new in full at
// once. A plain allocation where there is no madvise.
torch::Tensor hugepage_empty(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "hugepage_empty: a positive size is needed");
  constexpr size_t kHuge = size_t(2) << 20;
#if defined(__unix__) || defined(__APPLE__)
  const size_t alloc = (static_cast<size_t>(bytes) + kHuge - 1) / kHuge * kHuge;
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, alloc) == 0) {
#if defined(MADV_HUGEPAGE)
    madvise(p, alloc, MADV_HUGEPAGE);
#endif
    return torch::from_blob(p, {bytes}, [](void* q) { std::free(q); }, torch::TensorOptions().dtype(torch::kUInt8));
  }
#endif
  return torch::empty({bytes}, torch::TensorOptions().dtype(torch::kUInt8));
}

}  // namespace
