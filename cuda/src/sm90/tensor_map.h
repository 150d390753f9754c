// tensor_map.h: the host side of TMA for the Hopper kernels: the driver's tensor-map
// encoder, whether a tensor can be read as tiles, and the maps themselves.
#pragma once

#include <initializer_list>
#include <utility>

#include <cuda.h>
#include <cudaTypedefs.h>

#include "../backends.h"

namespace fcsa {
namespace sm90 {

// cuTensorMapEncodeTiled from the driver, found through the runtime (fcsa links the
// static runtime, never libcuda itself). Null when the driver lacks it.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder();

// Whether TMA can read `view` (b, heads, rows, d) as tiles: a 16-byte-aligned base,
// contiguous rows, every other stride a multiple of 16 bytes, and no broadcast (stride
// 0) over a dimension of more than one element.
bool tma_readable(const View &view);

// The map of (d, rows, heads, b) with boxes of 64 columns by box_rows rows, 128-byte
// swizzle, zeros outside the tensor. `who` names the caller in the error message.
fcsa_status encode_map(CUtensorMap *map, const View &view, int32_t dtype, int box_rows, const char *who);

// Whether a kernel can read every one of `views` (name, view) by TMA in boxes of up to
// 128 rows: NOT_SUPPORTED naming the first it cannot (tma_readable, or a map the driver
// refuses), SUCCESS otherwise.
using NamedView = std::pair<const char *, const View *>;
fcsa_status check_tma_views(std::initializer_list<NamedView> views, int32_t dtype, const char *who);

} // namespace sm90
} // namespace fcsa
