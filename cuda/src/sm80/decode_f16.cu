// The decode path (decode_launch.cuh) for __half; one dtype per file, so builds run in parallel.
#include "decode_launch.cuh"

namespace fcsa {
namespace sm80 {
namespace decode {
FCSA_INSTANTIATE_DECODE(__half)
} // namespace decode
} // namespace sm80
} // namespace fcsa
