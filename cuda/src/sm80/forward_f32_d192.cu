// forward_f32_d192.cu: the forward kernel for float inputs and head dims in the 192 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD(float, 192)
