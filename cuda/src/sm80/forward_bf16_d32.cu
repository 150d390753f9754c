// forward_bf16_d32.cu: the forward kernel for __nv_bfloat16 inputs and head dims in the 32 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD(__nv_bfloat16, 32)
