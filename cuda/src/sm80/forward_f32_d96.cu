// forward_f32_d96.cu: the forward kernel for float inputs and head dims in the 96 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD(float, 96)
