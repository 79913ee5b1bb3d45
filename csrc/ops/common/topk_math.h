// k-nearest-neighbour selection on host and device: a bounded max-heap of (distance, index) pairs
// and the exact rescoring of its candidates. Pairs compare lexicographically, so among equal
// distances the smaller index wins: the same order as a stable argsort.
#pragma once

#include <cstdint>

#include "../../macros.h"
#include "distance_math.h"

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

// Sorts `count` (distance, index) pairs ascending in place; insertion sort (a few dozen pairs).
REID_HOST_DEVICE void sort_pairs_ascending(float* dist, int64_t* idx, int64_t count) {
  for (int64_t a = 1; a < count; ++a) {
    const float vd = dist[a];
    const int64_t vi = idx[a];
    int64_t b = a - 1;
    while (b >= 0 && pair_less(vd, vi, dist[b], idx[b])) {
      dist[b + 1] = dist[b];
      idx[b + 1] = idx[b];
      --b;
    }
    dist[b + 1] = vd;
    idx[b + 1] = vi;
  }
}

// Extra candidates a kNN keeps beyond k before rescoring: GEMM rounding may misorder near-ties.
constexpr int64_t kRescoreMargin = 8;

// Exact rescoring of the `candidates` heap entries (hd, hi) of row x against the rows of y (row
// length D, per-row factors fy), then the best k written to out_dist / out_idx in (distance, index)
// order. Overwrites the heap.
REID_HOST_DEVICE void rescore_candidates(const float* x, const float* y, int64_t D, float fx, const float* fy,
                                         int64_t metric, float* hd, int64_t* hi, int64_t candidates, int64_t k,
                                         float* out_dist, int64_t* out_idx) {
  for (int64_t t = 0; t < candidates; ++t) hd[t] = exact_distance(x, y + hi[t] * D, D, fx, fy[hi[t]], metric);
  sort_pairs_ascending(hd, hi, candidates);
  for (int64_t t = 0; t < k; ++t) {
    out_dist[t] = hd[t];
    out_idx[t] = hi[t];
  }
}

}  // namespace reid_ops
