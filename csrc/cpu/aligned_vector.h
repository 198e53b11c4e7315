// Vectors whose storage starts on a cache line, for the per-channel arrays the kernels' loops read
// and write a vector of lanes at a time.
#pragma once
#include <cstddef>
#include <new>
#include <vector>

namespace torch_bn::cpu {

constexpr std::size_t kCacheLineAlignment = 64;

// malloc aligns to 16 bytes, so whether a std::vector's floats start on a 32-byte boundary is up
// to where it lands, and where they do not, every other 32-byte vector straddles two cache lines:
// a split load or store, in loops that do several per value. Channels-last backward adds every row
// into per-channel totals and reads per-channel means, and evaluation reads per-channel scales, all
// at vector width. In-process A/B against malloc's placement (AMD EPYC Zen 4 VM, 2 threads, medians
// of 15 interleaved rounds, two processes each): in the processes where that placement split,
// backward's statistics took 1.39-1.50 ms at 32x64x56x56 against 0.93-1.16 ms aligned, and
// 0.67-0.71 against 0.49-0.55 ms at 32x128x28x28; channels-last evaluation 0.37-0.52 against
// 0.28-0.46 ms at 32x512x14x14 and 3.55-5.06 against 2.92-4.06 ms at 32x256x56x56. Where it did
// not, the two were even (0.87-1.10 against 0.90-1.12 ms at 32x64x56x56), and forward-train was
// within the rounds' noise either way.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;

  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}

  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kCacheLineAlignment}));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{kCacheLineAlignment}); }

  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const {
    return false;
  }
};

template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

} // namespace torch_bn::cpu
