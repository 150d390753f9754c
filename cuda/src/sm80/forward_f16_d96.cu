// forward_f16_d96.cu: the forward kernel for __half inputs and head dims in the 96 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD(__half, 96)
