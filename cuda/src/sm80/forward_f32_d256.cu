// forward_f32_d256.cu: the forward kernel for float inputs and head dims in the 256 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD(float, 256)
