// forward_f32_d128.cu: the forward kernel for float inputs and head dims in the 128 bucket.
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD(float, 128)
