// forward_bf16_d128.cu: the Hopper forward kernel for __nv_bfloat16 inputs and head dims in the 128 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_SM90_FORWARD(__nv_bfloat16, 128)
