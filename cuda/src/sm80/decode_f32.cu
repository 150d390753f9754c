// The decode path (decode_launch.cuh) for float; one dtype per file, so builds run in parallel.
#include "decode_launch.cuh"

namespace fcsa {
namespace sm80 {
namespace decode {
FCSA_INSTANTIATE_DECODE(float)
} // namespace decode
} // namespace sm80
} // namespace fcsa
