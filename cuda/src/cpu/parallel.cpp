#include "cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

namespace fcsa {
namespace cpu {

int resolve_thread_count(int32_t requested, int64_t items) {
    int64_t threads = requested;
    if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
    threads = std::min(threads, std::max<int64_t>(items, 1));
    return int(std::max<int64_t>(threads, 1));
}

namespace {

// ---------------------------------------------------------------- the host's OpenMP
//
// PyTorch (and most numerical hosts) run their CPU ops on an OpenMP runtime whose idle
// workers spin for milliseconds after each op. Threads of our own would share the cores
// with those spinners and lose up to a third of their time on a small machine. So when
// the process has already loaded an OpenMP runtime (libgomp, LLVM's libomp or Intel's
// libiomp5, which all export the GOMP entry points), the work runs on its threads. The
// library never links or loads one itself: without it, plain std::threads do the work.

using GompParallel = void (*)(void (*)(void *), void *, unsigned, unsigned);
using OmpThreadNum = int (*)();

struct HostOpenMP {
    GompParallel parallel = nullptr;
    OmpThreadNum thread_num = nullptr;
};

#if defined(__linux__)
int find_openmp_object(struct dl_phdr_info *info, size_t, void *data) {
    const char *path = info->dlpi_name;
    if (path == nullptr || path[0] == '\0') return 0;
    const char *name = std::strrchr(path, '/');
    name = name != nullptr ? name + 1 : path;
    if (std::strncmp(name, "libgomp", 7) != 0 && std::strncmp(name, "libomp", 6) != 0 &&
        std::strncmp(name, "libiomp5", 8) != 0)
        return 0;
    // RTLD_NOLOAD: a handle to the copy already in the process, never a new load.
    void *handle = dlopen(path, RTLD_LAZY | RTLD_LOCAL | RTLD_NOLOAD);
    if (handle == nullptr) return 0;
    HostOpenMP found;
    found.parallel = reinterpret_cast<GompParallel>(dlsym(handle, "GOMP_parallel"));
    found.thread_num = reinterpret_cast<OmpThreadNum>(dlsym(handle, "omp_get_thread_num"));
    if (found.parallel == nullptr || found.thread_num == nullptr) {
        dlclose(handle);
        return 0;
    }
    *static_cast<HostOpenMP *>(data) = found; // the handle stays open: the runtime stays loaded
    return 1;
}
#endif

// The host's runtime, once found; looked for again on each call until then (a C host
// may load PyTorch after its first call into fcsa).
HostOpenMP host_openmp() {
#if defined(__linux__)
    static std::atomic<bool> found{false};
    static HostOpenMP cached;
    static std::mutex mutex;
    if (found.load(std::memory_order_acquire)) return cached;
    std::lock_guard<std::mutex> lock(mutex);
    if (!found.load(std::memory_order_relaxed)) {
        HostOpenMP runtime;
        dl_iterate_phdr(find_openmp_object, &runtime);
        if (runtime.parallel == nullptr) return runtime;
        cached = runtime;
        found.store(true, std::memory_order_release);
    }
    return cached;
#else
    return HostOpenMP{};
#endif
}

// Hands out items through one atomic counter; stops at the first exception.
struct WorkQueue {
    int64_t count;
    const std::function<void(int64_t, int)> &body;
    std::atomic<int64_t> next{0};
    std::atomic<bool> failed{false};
    std::exception_ptr first_error;
    std::mutex error_mutex;

    WorkQueue(int64_t count_, const std::function<void(int64_t, int)> &body_) : count(count_), body(body_) {}

    void work(int worker) {
        try {
            for (int64_t item = next.fetch_add(1); item < count && !failed.load(std::memory_order_relaxed);
                 item = next.fetch_add(1))
                body(item, worker);
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!first_error) first_error = std::current_exception();
            failed = true;
        }
    }
};

struct OpenMPTask {
    WorkQueue *queue;
    OmpThreadNum thread_num;
};

void run_openmp_task(void *data) {
    const OpenMPTask *task = static_cast<const OpenMPTask *>(data);
    task->queue->work(task->thread_num());
}

} // namespace

void parallel_for(int64_t count, int threads, const std::function<void(int64_t, int)> &body) {
    if (count <= 0) return;
    threads = int(std::min<int64_t>(std::max(threads, 1), count));
    if (threads == 1) {
        for (int64_t item = 0; item < count; ++item) body(item, 0);
        return;
    }

    WorkQueue queue(count, body);
    const HostOpenMP openmp = host_openmp();
    if (openmp.parallel != nullptr) {
        // A team of at most `threads` (fewer when nested); thread numbers are 0..threads-1.
        OpenMPTask task{&queue, openmp.thread_num};
        openmp.parallel(run_openmp_task, &task, unsigned(threads), 0);
    } else {
        std::vector<std::thread> helpers;
        helpers.reserve(size_t(threads - 1));
        for (int worker = 1; worker < threads; ++worker) {
            try {
                helpers.emplace_back([&queue, worker] { queue.work(worker); });
            } catch (const std::system_error &) {
                break; // the system refused another thread: the ones we have do the work
            }
        }
        queue.work(0);
        for (std::thread &helper : helpers) helper.join();
    }
    if (queue.first_error) std::rethrow_exception(queue.first_error);
}

} // namespace cpu
} // namespace fcsa
