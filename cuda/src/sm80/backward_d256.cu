// backward_d256.cu: the backward tile kernels for head dims in the 256 bucket (one file per
// bucket so that builds compile them in parallel). See backward_launch.cuh.
#include "backward_launch.cuh"

namespace fcsa {
namespace sm80_bwd {

FCSA_BWD_INSTANTIATE(__half, 256)
FCSA_BWD_INSTANTIATE(__nv_bfloat16, 256)
FCSA_BWD_INSTANTIATE(float, 256)

} // namespace sm80_bwd
} // namespace fcsa
