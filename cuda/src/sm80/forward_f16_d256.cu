// forward_f16_d256.cu: the forward kernel for __half inputs and head dims in the 256 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD(__half, 256)
