// forward_f16_d128_packed.cu: the Hopper forward kernel over packed sequences for __half inputs and head dims in the 128 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_SM90_FORWARD_PACKED(__half, 128)
