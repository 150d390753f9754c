// forward_f32_d32.cu: the forward kernel for float inputs and head dims in the 32 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD(float, 32)
