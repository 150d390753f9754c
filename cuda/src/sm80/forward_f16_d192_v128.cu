// forward_f16_d192_v128.cu: the forward kernel for __half inputs, q/k head dims in the 192
// bucket and value head dims up to 128 (a dedicated pair: see forward.cuh).
#include "forward_kernel.cuh"

FCSA_INSTANTIATE_FORWARD_DV(__half, 192, 128)
