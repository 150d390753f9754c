// forward_bf16_d64_key_mask.cu: the Hopper forward kernel under a key mask for __nv_bfloat16 inputs and head dims in the 64 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_SM90_FORWARD_KEY_MASK(__nv_bfloat16, 64)
