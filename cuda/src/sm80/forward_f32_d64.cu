// forward_f32_d64.cu: the forward kernel for float inputs and head dims in the 64 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD(float, 64)
