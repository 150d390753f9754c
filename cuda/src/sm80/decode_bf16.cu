// The decode path (decode_launch.cuh) for __nv_bfloat16; one dtype per file, so builds run in parallel.
#include "decode_launch.cuh"

namespace fcsa {
namespace sm80 {
namespace decode {
FCSA_INSTANTIATE_DECODE(__nv_bfloat16)
} // namespace decode
} // namespace sm80
} // namespace fcsa
