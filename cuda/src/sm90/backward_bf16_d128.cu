// backward_bf16_d128.cu: the Hopper backward kernel for __nv_bfloat16 inputs and head dim 128.
#include "backward_kernel.cuh"

FCSA_INSTANTIATE_SM90_BACKWARD(__nv_bfloat16, 128)
