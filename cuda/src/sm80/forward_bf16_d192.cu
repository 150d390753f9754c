// forward_bf16_d192.cu: the forward kernel for __nv_bfloat16 inputs and head dims in the 192 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD(__nv_bfloat16, 192)
