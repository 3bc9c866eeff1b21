/*
 * C ABI of the DPA prototype-attention CUDA kernels (SPEC §2.3-2.5, §4.2).
 *
 * One entry point per custom op, callable from C, C++ (the TensorRT plugins) and Python (ctypes).
 * The math and the layouts are those of export/reference.py, the single source of truth:
 *   all tensors row-major and contiguous, float32 or float16 I/O (`dtype`, one type for all float
 *   tensors of a call), float32 accumulation, every softmax max-subtracted.
 *
 * Pointers are device pointers. Work is enqueued on `stream` and not synchronised. Scratch memory
 * comes from the caller: `workspace` must hold at least `dpa_*_workspace_size(...)` bytes (256-byte
 * alignment is best; it may be NULL when that size is 0). Sizes are element counts; batch 0 is a no-op.
 * Every function returns a dpa_status; DPA_STATUS_CUDA_ERROR keeps the cudaError_t for
 * dpa_last_cuda_error() in the calling thread.
 */
#ifndef DPA_KERNELS_H
#define DPA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#if defined(_WIN32)
#define DPA_API __declspec(dllexport)
#else
#define DPA_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Version of this ABI: bumped whenever a signature or a behaviour below changes. */
#define DPA_KERNELS_ABI_VERSION 1

typedef enum dpa_dtype
{
    DPA_DTYPE_FLOAT32 = 0,
    DPA_DTYPE_FLOAT16 = 1
} dpa_dtype;

typedef enum dpa_status
{
    DPA_STATUS_SUCCESS = 0,
    DPA_STATUS_INVALID_ARGUMENT = 1,      /* NULL pointer, size < 1, unknown dtype, epsilon <= 0, ... */
    DPA_STATUS_WORKSPACE_TOO_SMALL = 2,   /* workspace_size < the dpa_*_workspace_size() query */
    DPA_STATUS_CUDA_ERROR = 3             /* a launch failed; see dpa_last_cuda_error() */
} dpa_status;

DPA_API int32_t dpa_abi_version(void);

/* A static, human-readable name of a dpa_status value. */
DPA_API const char* dpa_status_string(int32_t status);

/* The cudaError_t of the last DPA_STATUS_CUDA_ERROR returned in this thread (0 if none). */
DPA_API int32_t dpa_last_cuda_error(void);

/*
 * DpaPrototypes: features X (B, C, HW) -> prototypes P (B, C, C).
 * S = softmax over HW of each channel row of X; P[b, j, :] = sum_p S[b, j, p] X[b, :, p].
 */
DPA_API size_t dpa_prototypes_workspace_size(int64_t batch, int64_t channels, int64_t positions);
DPA_API int32_t dpa_prototypes(void const* features, void* prototypes, int64_t batch, int64_t channels,
    int64_t positions, int32_t dtype, void* workspace, size_t workspace_size, cudaStream_t stream);

/*
 * DpaPrototypeCorrelation: features X (B, C, HW) -> Psi (B, C, HW).
 * Psi[b, j, p] = cos(P[b, j, :], X[b, :, p]) with P = prototypes(X) (kept in float32) and
 * normalisation x / max(||x||_2, epsilon). epsilon > 0 (the model: 1e-6).
 */
DPA_API size_t dpa_prototype_correlation_workspace_size(int64_t batch, int64_t channels, int64_t positions);
DPA_API int32_t dpa_prototype_correlation(void const* features, void* correlation, int64_t batch,
    int64_t channels, int64_t positions, float epsilon, int32_t dtype, void* workspace, size_t workspace_size,
    cudaStream_t stream);

/*
 * DpaCrossModalAttention: K_A, K_M, V_A, V_M each (B, D, HW) -> T_A, T_M each (B, D, HW).
 * Phi = K_A K_M^T * scale (B, D, D); T_A = softmax_rows(Phi) V_M; T_M = softmax_rows(Phi^T) V_A.
 * The model's scale is 1 / sqrt(HW).
 */
DPA_API size_t dpa_cross_modal_attention_workspace_size(int64_t batch, int64_t dim, int64_t positions);
DPA_API int32_t dpa_cross_modal_attention(void const* key_appearance, void const* key_motion,
    void const* value_appearance, void const* value_motion, void* to_appearance, void* to_motion, int64_t batch,
    int64_t dim, int64_t positions, float scale, int32_t dtype, void* workspace, size_t workspace_size,
    cudaStream_t stream);

/*
 * DpaPrototypeMemoryRead: features X^ (B, D, HW), memory keys K and values V (B, N, T, D),
 * valid (B, N) (nonzero = valid; `valid_dtype` may be float32 whatever `dtype` is) -> Psi2 (B, D, HW).
 * Q = prototypes(X^) (B, D, D); R = softmax_rows(Q K^T * scale) V over the N*T memory tokens, where the
 * tokens of invalid slots are skipped (zero weight; NaN/Inf stored there cannot leak);
 * Psi2 = correlation(R, X^) as in dpa_prototype_correlation. The model's scale is 1 / sqrt(D).
 * A batch item without any valid slot (undefined in the model) gets R = 0, hence Psi2 = 0.
 */
DPA_API size_t dpa_prototype_memory_read_workspace_size(
    int64_t batch, int64_t dim, int64_t positions, int64_t slots, int64_t tokens);
DPA_API int32_t dpa_prototype_memory_read(void const* features, void const* memory_keys,
    void const* memory_values, void const* valid, void* correlation, int64_t batch, int64_t dim, int64_t positions,
    int64_t slots, int64_t tokens, float scale, float epsilon, int32_t dtype, int32_t valid_dtype, void* workspace,
    size_t workspace_size, cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DPA_KERNELS_H */
