// forward_f16_d64.cu: the Hopper forward kernel for __half inputs and head dims in the 64 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_SM90_FORWARD(__half, 64)
