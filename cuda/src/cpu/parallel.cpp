#include "cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace fcsa {
namespace cpu {

int resolve_thread_count(int32_t requested, int64_t items) {
    int64_t threads = requested;
    if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
    threads = std::min(threads, std::max<int64_t>(items, 1));
    return int(std::max<int64_t>(threads, 1));
}

void parallel_for(int64_t count, int threads, const std::function<void(int64_t, int)> &body) {
    if (count <= 0) return;
    threads = int(std::min<int64_t>(std::max(threads, 1), count));
    if (threads == 1) {
        for (int64_t item = 0; item < count; ++item) body(item, 0);
        return;
    }

    std::atomic<int64_t> next{0};
    std::atomic<bool> failed{false};
    std::exception_ptr first_error;
    std::mutex error_mutex;
    auto work = [&](int worker) {
        try {
            for (int64_t item = next.fetch_add(1); item < count && !failed.load(std::memory_order_relaxed);
                 item = next.fetch_add(1))
                body(item, worker);
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!first_error) first_error = std::current_exception();
            failed = true;
        }
    };

    std::vector<std::thread> helpers;
    helpers.reserve(size_t(threads - 1));
    for (int worker = 1; worker < threads; ++worker) {
        try {
            helpers.emplace_back(work, worker);
        } catch (const std::system_error &) {
            break; // the system refused another thread: the ones we have do the work
        }
    }
    work(0);
    for (std::thread &helper : helpers) helper.join();
    if (first_error) std::rethrow_exception(first_error);
}

} // namespace cpu
} // namespace fcsa
