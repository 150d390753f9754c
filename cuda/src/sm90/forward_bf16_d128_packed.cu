// forward_bf16_d128_packed.cu: the Hopper forward kernel over packed sequences for __nv_bfloat16 inputs and head dims in the 128 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_SM90_FORWARD_PACKED(__nv_bfloat16, 128)
