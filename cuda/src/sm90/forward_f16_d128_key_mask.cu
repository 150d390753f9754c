// forward_f16_d128_key_mask.cu: the Hopper forward kernel under a key mask for __half inputs and head dims in the 128 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_SM90_FORWARD_KEY_MASK(__half, 128)
