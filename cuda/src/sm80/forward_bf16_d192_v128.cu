// forward_bf16_d192_v128.cu: the forward kernel for __nv_bfloat16 inputs, q/k head dims in the 192
// bucket and value head dims up to 128 (a dedicated pair: see forward.cuh).
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD_DV(__nv_bfloat16, 192, 128)
