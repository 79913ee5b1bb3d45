// A bounded max-heap of (distance, index) pairs used for k-nearest-neighbour selection on host and
// device. Pairs compare lexicographically, so among equal distances the smaller index wins: the
// same order as a stable argsort.
#pragma once

#include <cstdint>

#include "../../macros.h"

namespace reid_ops {

REID_HOST_DEVICE bool pair_less(float da, int64_t ia, float db, int64_t ib) {
  return da < db || (da == db && ia < ib);
}

// Fills a heap of size k with sentinels larger than any real pair.
REID_HOST_DEVICE void heap_init(float* dist, int64_t* idx, int64_t k) {
  for (int64_t t = 0; t < k; ++t) {
    dist[t] = INFINITY;
    idx[t] = INT64_MAX;
  }
}

REID_HOST_DEVICE void heap_sift_down(float* dist, int64_t* idx, int64_t size, int64_t pos) {
  while (true) {
    const int64_t left = 2 * pos + 1;
    if (left >= size) return;
    int64_t largest = left;
    const int64_t right = left + 1;
    if (right < size && pair_less(dist[left], idx[left], dist[right], idx[right])) largest = right;
    if (!pair_less(dist[pos], idx[pos], dist[largest], idx[largest])) return;
    const float td = dist[pos];
    dist[pos] = dist[largest];
    dist[largest] = td;
    const int64_t ti = idx[pos];
    idx[pos] = idx[largest];
    idx[largest] = ti;
    pos = largest;
  }
}

// Offers (d, i) to a max-heap holding the k best pairs so far.
REID_HOST_DEVICE void heap_offer(float* dist, int64_t* idx, int64_t k, float d, int64_t i) {
  if (!pair_less(d, i, dist[0], idx[0])) return;
  dist[0] = d;
  idx[0] = i;
  heap_sift_down(dist, idx, k, 0);
}

// Turns the heap into an ascending list in place (heap sort).
REID_HOST_DEVICE void heap_sort_ascending(float* dist, int64_t* idx, int64_t k) {
  for (int64_t end = k - 1; end > 0; --end) {
    const float td = dist[0];
    dist[0] = dist[end];
    dist[end] = td;
    const int64_t ti = idx[0];
    idx[0] = idx[end];
    idx[end] = ti;
    heap_sift_down(dist, idx, end, 0);
  }
}

}  // namespace reid_ops
