// backward_bf16_d128_packed.cu: the Hopper backward kernel over packed sequences for __nv_bfloat16 inputs and head dim 128.
#include "backward_kernel.cuh"

FCSA_INSTANTIATE_SM90_BACKWARD_PACKED(__nv_bfloat16, 128)
