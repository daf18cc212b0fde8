// Memory placement helpers of the CPU kernels.
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <new>

namespace svp::cpu {

// Outputs of at least this many bytes are written through transparent huge pages where the kernel offers
// them. Allocations this large are fresh mappings on every call (glibc maps blocks above its largest
// dynamic mmap threshold, 32 MiB, directly and unmaps them on free), so without huge pages a call spends
// most of its time in one page fault per 4 KiB of the output.
constexpr size_t kHugePageOutputBytes = size_t(32) << 20;

// Asks the kernel to back [data, data + bytes) with 2 MiB pages (madvise MADV_HUGEPAGE on the 2 MiB-aligned
// interior) before the memory is first written; a hint, so it changes no value and failures are ignored.
// Does nothing below kHugePageOutputBytes or where the platform has no such advice.
void advise_huge_pages(void* data, size_t bytes);

// Per-thread scratch kept from call to call: ThreadScratch<Tag, U> scratch(n) gives n uninitialised
// elements of U, in a block owned by the calling thread and reused by the next instance with the same Tag
// on that thread, so a kernel's large temporaries are not mapped, faulted in and unmapped again on every
// call. One instance per Tag and thread may be alive at a time (each call site declares its own Tag).
// Blocks above kKeptScratchBytes are given back when the instance dies. Blocks start on a 64-byte
// boundary, so that rows whose stride is a whole number of cache lines never straddle two.
constexpr size_t kKeptScratchBytes = size_t(8) << 20;  // at most this much stays per Tag and thread
constexpr std::align_val_t kScratchAlignment{64};

// The deleter of blocks from ::operator new[](bytes, kScratchAlignment).
struct AlignedDelete {
  void operator()(void* data) const { ::operator delete[](data, kScratchAlignment); }
};

// n zero-initialised elements of T on a 64-byte boundary, owned by this instance (a task's tile of R̃).
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(size_t count)
      : data_(count == 0 ? nullptr : static_cast<T*>(::operator new[](count * sizeof(T), kScratchAlignment))) {
    std::fill_n(data_.get(), count, T(0));
  }
  T* data() const { return data_.get(); }

 private:
  std::unique_ptr<T[], AlignedDelete> data_;
};

template <typename Tag, typename U>
class ThreadScratch {
 public:
  explicit ThreadScratch(size_t count) : block_(thread_block()) {
    const size_t bytes = count * sizeof(U);
    if (bytes > block_.capacity) {
      block_.data.reset();  // never hold the old and the new block at once
      block_.data.reset(static_cast<unsigned char*>(::operator new[](bytes, kScratchAlignment)));
      block_.capacity = bytes;
    }
  }
  ~ThreadScratch() {
    if (block_.capacity > kKeptScratchBytes) {
      block_.data.reset();
      block_.capacity = 0;
    }
  }
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;

  U* data() const { return reinterpret_cast<U*>(block_.data.get()); }

 private:
  struct Block {
    std::unique_ptr<unsigned char[], AlignedDelete> data;
    size_t capacity = 0;
  };
  static Block& thread_block() {
    thread_local Block block;
    return block;
  }
  Block& block_;
};

}  // namespace svp::cpu
