// forward_f16_d32.cu: the forward kernel for __half inputs and head dims in the 32 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD(__half, 32)
