// Fetching a run's streams ahead of the loop that reads them.
// Compiled once per CPU capability (see kernels_*.cpp), in a namespace named after it, as ATen's
// at::vec is, so that the builds do not collide.
#pragma once
#include "run_sources.h"
#include "vector_loads.h"

#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdint>

namespace torch_bn::cpu {
namespace CPU_CAPABILITY {

// Up to two streams (x, dy) of a run whose lines a loop fetches `distance` values ahead of those
// it reads: a reduction a loop step at a time, a write pass a piece at a time (see
// write_fetching_ahead). A distance of 0 fetches nothing. Streams are kept as addresses (see
// prefetch_lines).
struct FetchAhead {
  std::array<uintptr_t, 2> streams{};
  int64_t distance_bytes = 0;
  int64_t value_bytes = 0;

  template <typename T>
  static FetchAhead of(const T* a, const T* b, int64_t distance) {
    return {{reinterpret_cast<uintptr_t>(a), reinterpret_cast<uintptr_t>(b)},
            distance * static_cast<int64_t>(sizeof(T)), static_cast<int64_t>(sizeof(T))};
  }

  bool active() const {
    return distance_bytes != 0;
  }

  // Fetches the lines of values [j, j + n) of the streams, `distance` ahead.
  C10_ALWAYS_INLINE void fetch(int64_t j, int64_t n) const {
    if (!active()) {
      return;
    }
    for (const uintptr_t stream : streams) {
      if (stream) {
        prefetch_lines(stream + j * value_bytes + distance_bytes, n * value_bytes);
      }
    }
  }

  // Fetches the lines of the loop step (for_each_vector's kUnroll vectors of acc_t) from
  // value j.
  template <typename acc_t>
  C10_ALWAYS_INLINE void step(int64_t j) const {
    fetch(j, kUnroll * Vectorized<acc_t>::size());
  }
};

// Values a write pass writes per fetch of the lines ahead (see write_fetching_ahead): 256, 512
// and 1024 measured alike.
constexpr int64_t kFetchPieceValues = 512;

// Calls write(offset, length) on the run [0, n) a piece of kFetchPieceValues values at a time,
// each piece after fetching the lines of `ahead`'s streams that lie `distance` past it, so that
// the memory reads ahead while the core writes. Without a distance, in one call. The last piece
// takes all that is left (up to twice the others): a piece shorter than a vector would be
// written by scalar code, whose rounding can differ from the vector lanes', and whether a run is
// split at all depends on the thread count (see PlanarPlan::next_group_distance). Pieces that
// are whole vectors write every value as the unsplit run does.
template <typename F>
C10_ALWAYS_INLINE void write_fetching_ahead(const FetchAhead& ahead, int64_t n, const F& write) {
  if (!ahead.active()) {
    write(int64_t{0}, n);
    return;
  }
  for (int64_t offset = 0; offset < n;) {
    const int64_t length = n - offset < 2 * kFetchPieceValues ? n - offset : kFetchPieceValues;
    ahead.fetch(offset, length);
    write(offset, length);
    offset += length;
  }
}

} // namespace CPU_CAPABILITY
} // namespace torch_bn::cpu
