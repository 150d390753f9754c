// backward_d64.cu: the backward tile kernels for head dims in the 64 bucket (one file per
// bucket so that builds compile them in parallel). See backward_launch.cuh.
#include "backward_launch.cuh"

namespace fcsa {
namespace sm80_bwd {

FCSA_BWD_INSTANTIATE(__half, 64)
FCSA_BWD_INSTANTIATE(__nv_bfloat16, 64)
FCSA_BWD_INSTANTIATE(float, 64)

} // namespace sm80_bwd
} // namespace fcsa
