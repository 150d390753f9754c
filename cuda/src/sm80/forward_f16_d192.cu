// forward_f16_d192.cu: the forward kernel for __half inputs and head dims in the 192 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD(__half, 192)
