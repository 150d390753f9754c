// parallel.h: the CPU backend's threading. Work items go out through one atomic
// counter to the threads of the host's OpenMP runtime when the process has one loaded
// (PyTorch does: its idle workers would otherwise spin beside ours), else to short-lived
// std::threads of the call's own (no pool that outlives the call, nothing to clean up at
// unload or fork). Which thread runs an item never changes what the item computes, so
// results do not depend on the thread count or on which threads ran.
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
