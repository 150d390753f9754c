// parallel.h: the CPU backend's threading. Each call starts its own short-lived
// threads (no pool that outlives the call, nothing to clean up at unload or fork) and
// hands out work items through one atomic counter. Which thread runs an item never
// changes what the item computes, so results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <functional>

namespace fcsa {
namespace cpu {

// The worker count a call uses: `requested` (0 = every hardware thread), at most
// `items`, at least 1.
int resolve_thread_count(int32_t requested, int64_t items);

// Runs body(item, worker) for every item in [0, count), on `threads` threads of which
// the calling thread is worker 0. Items are taken in increasing order. An exception
// thrown by the body stops the remaining items and is rethrown here.
void parallel_for(int64_t count, int threads, const std::function<void(int64_t item, int worker)> &body);

} // namespace cpu
} // namespace fcsa
