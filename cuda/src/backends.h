// backends.h: what api.cpp calls after validation. Each backend receives a checked
// Problem and may assume everything api.cpp guarantees (see problem.h); it reports
// failures through set_error and returns a status, never throws across this line.
#pragma once

#include <cstddef>

#include "fcsa.h"
#include "problem.h"

namespace fcsa {

// Sets this thread's fcsa_last_error_message (printf-style) and returns `status`.
fcsa_status set_error(fcsa_status status, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

// ---- CPU backend (cpu/): every feature, any d. Workspace is host memory.
size_t cpu_forward_workspace(const Problem &p);
size_t cpu_backward_workspace(const Problem &p);
fcsa_status cpu_forward(const Problem &p, void *workspace);
fcsa_status cpu_backward(const Problem &p, void *workspace);
// Packed sequences (p.varlen()), each run by the above as a problem of its own (cpu/varlen.cpp).
size_t cpu_varlen_workspace(const Problem &p, bool backward);
fcsa_status cpu_varlen_forward(const Problem &p, void *workspace);
fcsa_status cpu_varlen_backward(const Problem &p, void *workspace);

#if defined(FCSA_WITH_CUDA)
// ---- portable CUDA backend (sm80/): sm_80 and newer. Workspace is device memory on
// p.device_index; `stream` is a cudaStream_t. The caller has made p.device_index the
// current device. sm80_supports returns SUCCESS or NOT_SUPPORTED with a message set.
fcsa_status sm80_supports(const Problem &p, bool backward);
// The shared memory one block may use on `device` (its opt-in maximum), lowered to the
// environment variable FCSA_MAX_SHARED_MEMORY (bytes) when that is set: a way to run
// the configurations of GPUs with less shared memory on a larger one. -1 when the
// device cannot be queried.
int sm80_shared_memory_limit(int device);
size_t sm80_forward_workspace(const Problem &p);
// hopper: the backward's main kernel is the Hopper one (sm90_backward_supports said
// yes); its passes, workspace and finishing stay these.
size_t sm80_backward_workspace(const Problem &p, bool hopper);
fcsa_status sm80_forward(const Problem &p, void *workspace, void *stream);
fcsa_status sm80_backward(const Problem &p, void *workspace, void *stream, bool hopper);

// ---- Hopper backend (sm90/): compute capability 9.0 with sm_90a code in the build; the
// forward and the backward's main kernel of the common case (sm90_*_supports say which,
// else NOT_SUPPORTED with the reason). Everything they do not cover runs on sm80/.
fcsa_status sm90_forward_supports(const Problem &p);
size_t sm90_forward_workspace(const Problem &p);
fcsa_status sm90_forward(const Problem &p, void *workspace, void *stream);
fcsa_status sm90_backward_supports(const Problem &p);
// The backward's workspace beyond the portable backward's: 1 / ||k|| per key (floats),
// and for packed sequences a key-tile table (sm80/varlen.cuh) of this many keys a tile.
int64_t sm90_backward_key_norm_floats(const Problem &p);
int sm90_backward_key_tile();
// What the portable backward's passes hand to the Hopper main kernel (its workspace).
struct Sm90BackwardBuffers {
    const float *lse, *delta, *q_inv_norm; // per query row, contiguous (the prepass)
    float *k_inv_norm;                     // sm90_backward_key_norm_floats of them
    float *dq_acc, *dk_acc;                // dQ^ / ||q|| (zeroed), dK^ (written)
    void *key_tiles;                       // packed sequences: room for the key-tile table
};
// The key-norm pass and the main kernel: dv written, dq_acc added to, dk_acc written.
fcsa_status sm90_backward_main(const Problem &p, const Sm90BackwardBuffers &buffers, void *stream);
#endif

} // namespace fcsa
