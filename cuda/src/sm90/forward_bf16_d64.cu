// forward_bf16_d64.cu: the Hopper forward kernel for __nv_bfloat16 inputs and head dims in the 64 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_SM90_FORWARD(__nv_bfloat16, 64)
