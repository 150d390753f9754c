// tensor_map.cu: the host side of TMA (tensor_map.h).
#include "tensor_map.h"

#include <cuda_runtime.h>

namespace fcsa {
namespace sm90 {

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
        void *fn = nullptr;
        cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
                cudaSuccess ||
            found != cudaDriverEntryPointSuccess) {
            cudaGetLastError();
            return PFN_cuTensorMapEncodeTiled_v12000(nullptr);
        }
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }();
    return encoder;
}

bool tma_readable(const View &view) {
    if (!view.rows_16byte_aligned(2) || view.stride[3] != 1) return false;
    for (int i = 0; i < 3; ++i)
        if (view.stride[i] * 2 >= (int64_t(1) << 40) || (view.shape[i] > 1 && view.stride[i] == 0)) return false;
    return true;
}

// Dimensions of one element get the stride of a packed layout (TMA wants a valid one; it
// is never stepped).
fcsa_status encode_map(CUtensorMap *map, const View &view, int32_t dtype, int box_rows, const char *who) {
    cuuint64_t dims[4] = {cuuint64_t(view.shape[3]), cuuint64_t(view.shape[2]), cuuint64_t(view.shape[1]),
                          cuuint64_t(view.shape[0])};
    cuuint64_t strides[3];
    int64_t packed = view.shape[3] * 2;
    for (int i = 0; i < 3; ++i) {
        const int64_t stride = view.stride[2 - i] * 2;
        strides[i] = cuuint64_t(view.shape[2 - i] > 1 ? stride : (packed + 15) / 16 * 16);
        packed = int64_t(strides[i]) * view.shape[2 - i];
    }
    cuuint32_t box[4] = {64, cuuint32_t(box_rows), 1, 1};
    cuuint32_t element_strides[4] = {1, 1, 1, 1};
    const CUresult result = tensor_map_encoder()(
        map, dtype == FCSA_DTYPE_BFLOAT16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
        view.data, dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (result != CUDA_SUCCESS)
        return set_error(FCSA_STATUS_CUDA_ERROR, "%s: cuTensorMapEncodeTiled failed (error %d)", who,
                         int(result));
    return FCSA_STATUS_SUCCESS;
}

fcsa_status check_tma_views(std::initializer_list<NamedView> views, int32_t dtype, const char *who) {
    for (const NamedView &named : views)
        if (!tma_readable(*named.second))
            return set_error(FCSA_STATUS_NOT_SUPPORTED,
                             "%s: %s needs a 16-byte-aligned base, contiguous rows, 16-byte-aligned strides and no "
                             "broadcast dimension",
                             who, named.first);
    if (tensor_map_encoder() == nullptr)
        return set_error(FCSA_STATUS_NOT_SUPPORTED, "%s: the driver has no cuTensorMapEncodeTiled", who);
    // The maps a call builds: a layout the driver rejects goes to the portable path.
    CUtensorMap map;
    for (const NamedView &named : views)
        if (encode_map(&map, *named.second, dtype, 128, who) != FCSA_STATUS_SUCCESS)
            return set_error(FCSA_STATUS_NOT_SUPPORTED, "%s: the driver refuses a tensor map of %s", who, named.first);
    return FCSA_STATUS_SUCCESS;
}

} // namespace sm90
} // namespace fcsa
