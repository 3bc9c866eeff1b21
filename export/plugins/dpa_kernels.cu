/*
 * The C ABI of dpa_kernels.h: argument checks, workspace layouts and the kernel sequence of each op.
 *
 * Intermediates (softmax statistics, prototypes, attention matrices, norms) stay float32 in the workspace
 * whatever the I/O type; only the op outputs are rounded to the I/O type.
 */
#include "dpa_kernels.cuh"
#include "dpa_kernels.h"

#include <algorithm>
#include <climits>
#include <cmath>

namespace dpa
{
namespace
{

using kernels::kGemmThreads;
using kernels::kRowThreads;
using kernels::kTile;
using kernels::kTileRows;
using kernels::kWarpSize;

constexpr size_t kWorkspaceAlignment = 256;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kSplitDepth = 256; // positions per split of the long-K products (prototypes, Phi)
constexpr int64_t kMaxSplits = 16;
constexpr int kElementwiseThreads = 256;

thread_local int32_t gLastCudaError = 0;

int64_t ceilDiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

// Offsets of float32 buffers in the caller's workspace, each 256-byte aligned.
class WorkspaceLayout
{
public:
    size_t add(int64_t floats)
    {
        size_t const offset = mSize;
        size_t const bytes = static_cast<size_t>(floats) * sizeof(float);
        mSize += (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
        return offset;
    }

    size_t size() const
    {
        return mSize;
    }

private:
    size_t mSize{0};
};

float* at(void* workspace, size_t offset)
{
    return reinterpret_cast<float*>(static_cast<char*>(workspace) + offset);
}

// Deterministic split-K over a long shared axis: the partial sums are reduced in split order.
struct SplitK
{
    int splits{1};
    int chunk{0};

    explicit SplitK(int64_t k)
    {
        int64_t const wanted = std::min(kMaxSplits, std::max<int64_t>(1, k / kSplitDepth));
        chunk = static_cast<int>(ceilDiv(ceilDiv(k, wanted), kTile) * kTile);
        splits = static_cast<int>(ceilDiv(k, chunk));
    }
};

// C = alpha * op(A) B^T for a batch of (M, K) x (N, K) products, split-K when K is long.
struct GemmNtPlan
{
    SplitK split;
    size_t partial{0};

    GemmNtPlan(WorkspaceLayout& layout, int64_t batch, int64_t m, int64_t n, int64_t k)
        : split(k)
    {
        if (split.splits > 1)
        {
            partial = layout.add(split.splits * batch * m * n);
        }
    }
};

// Prototypes P = softmax_rows(X) X^T of X (B, C, HW).
struct PrototypesPlan
{
    size_t stats;
    GemmNtPlan product;

    PrototypesPlan(WorkspaceLayout& layout, int64_t batch, int64_t channels, int64_t positions)
        : stats(layout.add(2 * batch * channels))
        , product(layout, batch, channels, channels, positions)
    {
    }
};

// Correlation of float32 prototype tokens (B, P, C) with X (B, C, HW).
struct CorrelationPlan
{
    size_t rowInverse;
    size_t columnInverse;

    CorrelationPlan(WorkspaceLayout& layout, int64_t batch, int64_t tokens, int64_t positions)
        : rowInverse(layout.add(batch * tokens))
        , columnInverse(layout.add(batch * positions))
    {
    }
};

struct PrototypeCorrelationPlan
{
    WorkspaceLayout layout;
    size_t prototypes;
    PrototypesPlan prototypesPlan;
    CorrelationPlan correlation;

    PrototypeCorrelationPlan(int64_t batch, int64_t channels, int64_t positions)
        : prototypes(layout.add(batch * channels * channels))
        , prototypesPlan(layout, batch, channels, positions)
        , correlation(layout, batch, channels, positions)
    {
    }
};

struct CrossModalAttentionPlan
{
    WorkspaceLayout layout;
    size_t affinity;
    size_t toAppearanceWeights;
    size_t toMotionWeights;
    GemmNtPlan product;

    CrossModalAttentionPlan(int64_t batch, int64_t dim, int64_t positions)
        : affinity(layout.add(batch * dim * dim))
        , toAppearanceWeights(layout.add(batch * dim * dim))
        , toMotionWeights(layout.add(batch * dim * dim))
        , product(layout, batch, dim, dim, positions)
    {
    }
};

struct MemoryReadPlan
{
    WorkspaceLayout layout;
    size_t slotValid;
    size_t query;
    size_t weights;
    size_t read;
    PrototypesPlan prototypesPlan;
    GemmNtPlan logits;
    CorrelationPlan correlation;

    MemoryReadPlan(int64_t batch, int64_t dim, int64_t positions, int64_t slots, int64_t tokens)
        : slotValid(layout.add(batch * slots))
        , query(layout.add(batch * dim * dim))
        , weights(layout.add(batch * dim * slots * tokens))
        , read(layout.add(batch * dim * dim))
        , prototypesPlan(layout, batch, dim, positions)
        , logits(layout, batch, dim, slots * tokens, dim)
        , correlation(layout, batch, dim, positions)
    {
    }
};

int32_t launchStatus()
{
    cudaError_t const error = cudaGetLastError();
    if (error != cudaSuccess)
    {
        gLastCudaError = static_cast<int32_t>(error);
        return DPA_STATUS_CUDA_ERROR;
    }
    return DPA_STATUS_SUCCESS;
}

#define DPA_CHECK_LAUNCH()                                                                                             \
    do                                                                                                                 \
    {                                                                                                                  \
        int32_t const launchStatusValue = launchStatus();                                                              \
        if (launchStatusValue != DPA_STATUS_SUCCESS)                                                                   \
        {                                                                                                              \
            return launchStatusValue;                                                                                  \
        }                                                                                                              \
    } while (0)

dim3 gemmGrid(int64_t m, int64_t n, int64_t z)
{
    return dim3(static_cast<unsigned>(ceilDiv(n, kTile)), static_cast<unsigned>(ceilDiv(m, kTile)),
        static_cast<unsigned>(z));
}

template <typename TA, typename TB, typename TO, bool kSoftmaxA>
int32_t gemmNt(GemmNtPlan const& plan, TA const* a, TB const* b, float2 const* aStats, int64_t batch, int64_t m,
    int64_t n, int64_t k, float alpha, void* workspace, TO* out, cudaStream_t stream)
{
    int const splits = plan.split.splits;
    float* partial = splits > 1 ? at(workspace, plan.partial) : nullptr;
    dim3 const block(kTile, kTileRows);
    kernels::gemm_nt_kernel<TA, TB, TO, kSoftmaxA><<<gemmGrid(m, n, batch * splits), block, 0, stream>>>(a, b,
        aStats, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(batch), splits,
        plan.split.chunk, alpha, partial, out);
    DPA_CHECK_LAUNCH();
    if (splits > 1)
    {
        int64_t const count = batch * m * n;
        int64_t const blocks = std::min<int64_t>(ceilDiv(count, kElementwiseThreads), 4096);
        kernels::splitk_reduce_kernel<TO>
            <<<static_cast<unsigned>(blocks), kElementwiseThreads, 0, stream>>>(partial, splits, count, alpha, out);
        DPA_CHECK_LAUNCH();
    }
    return DPA_STATUS_SUCCESS;
}

template <typename TB, typename TO, bool kMaskRowsOfB>
int32_t gemmNn(float const* a, TB const* b, float const* rowScale, float const* colScale, float const* slotValid,
    int64_t tokensPerSlot, int64_t slots, int64_t batch, int64_t m, int64_t n, int64_t k, TO* out,
    cudaStream_t stream)
{
    dim3 const block(kTile, kTileRows);
    kernels::gemm_nn_kernel<TB, TO, kMaskRowsOfB><<<gemmGrid(m, n, batch), block, 0, stream>>>(a, b, rowScale,
        colScale, slotValid, static_cast<int>(tokensPerSlot), static_cast<int>(slots), static_cast<int>(m),
        static_cast<int>(n), static_cast<int>(k), out);
    DPA_CHECK_LAUNCH();
    return DPA_STATUS_SUCCESS;
}

template <typename T, typename TO>
int32_t prototypes(PrototypesPlan const& plan, T const* features, int64_t batch, int64_t channels,
    int64_t positions, void* workspace, TO* out, cudaStream_t stream)
{
    auto* stats = reinterpret_cast<float2*>(at(workspace, plan.stats));
    kernels::row_softmax_stats_kernel<T>
        <<<static_cast<unsigned>(batch * channels), kRowThreads, 0, stream>>>(features, static_cast<int>(positions), stats);
    DPA_CHECK_LAUNCH();
    return gemmNt<T, T, TO, true>(
        plan.product, features, features, stats, batch, channels, channels, positions, 1.0F, workspace, out, stream);
}

// out = correlation(tokens, features): tokens float32 (B, P, C) in the workspace, features (B, C, HW).
template <typename T>
int32_t correlation(CorrelationPlan const& plan, float const* tokens, T const* features, int64_t batch,
    int64_t tokenCount, int64_t channels, int64_t positions, float epsilon, void* workspace, T* out,
    cudaStream_t stream)
{
    float* rowInverse = at(workspace, plan.rowInverse);
    float* columnInverse = at(workspace, plan.columnInverse);
    int64_t const rows = batch * tokenCount;
    int const rowsPerBlock = kElementwiseThreads / kWarpSize;
    kernels::row_inverse_norm_kernel<<<static_cast<unsigned>(ceilDiv(rows, rowsPerBlock)), kElementwiseThreads, 0,
        stream>>>(tokens, rows, static_cast<int>(channels), epsilon, rowInverse);
    DPA_CHECK_LAUNCH();
    dim3 const grid(static_cast<unsigned>(ceilDiv(positions, kElementwiseThreads)), static_cast<unsigned>(batch));
    kernels::column_inverse_norm_kernel<T><<<grid, kElementwiseThreads, 0, stream>>>(
        features, static_cast<int>(channels), static_cast<int>(positions), epsilon, columnInverse);
    DPA_CHECK_LAUNCH();
    return gemmNn<T, T, false>(tokens, features, rowInverse, columnInverse, nullptr, 1, 1, batch, tokenCount,
        positions, channels, out, stream);
}

template <typename T>
int32_t prototypeCorrelation(PrototypeCorrelationPlan const& plan, T const* features, int64_t batch,
    int64_t channels, int64_t positions, float epsilon, void* workspace, T* out, cudaStream_t stream)
{
    float* tokens = at(workspace, plan.prototypes);
    int32_t const status
        = prototypes<T, float>(plan.prototypesPlan, features, batch, channels, positions, workspace, tokens, stream);
    if (status != DPA_STATUS_SUCCESS)
    {
        return status;
    }
    return correlation<T>(
        plan.correlation, tokens, features, batch, channels, channels, positions, epsilon, workspace, out, stream);
}

template <typename T>
int32_t crossModalAttention(CrossModalAttentionPlan const& plan, T const* keyAppearance, T const* keyMotion,
    T const* valueAppearance, T const* valueMotion, T* toAppearance, T* toMotion, int64_t batch, int64_t dim,
    int64_t positions, float scale, void* workspace, cudaStream_t stream)
{
    float* affinity = at(workspace, plan.affinity);
    float* toAppearanceWeights = at(workspace, plan.toAppearanceWeights);
    float* toMotionWeights = at(workspace, plan.toMotionWeights);
    int32_t status = gemmNt<T, T, float, false>(
        plan.product, keyAppearance, keyMotion, nullptr, batch, dim, dim, positions, scale, workspace, affinity, stream);
    if (status != DPA_STATUS_SUCCESS)
    {
        return status;
    }
    dim3 const grid(static_cast<unsigned>(dim), static_cast<unsigned>(batch));
    kernels::row_softmax_kernel<false><<<grid, kRowThreads, 0, stream>>>(
        affinity, toAppearanceWeights, static_cast<int>(dim), static_cast<int>(dim), nullptr, 1, 1);
    DPA_CHECK_LAUNCH();
    kernels::row_softmax_kernel<true><<<grid, kRowThreads, 0, stream>>>(
        affinity, toMotionWeights, static_cast<int>(dim), static_cast<int>(dim), nullptr, 1, 1);
    DPA_CHECK_LAUNCH();
    status = gemmNn<T, T, false>(
        toAppearanceWeights, valueMotion, nullptr, nullptr, nullptr, 1, 1, batch, dim, positions, dim, toAppearance,
        stream);
    if (status != DPA_STATUS_SUCCESS)
    {
        return status;
    }
    return gemmNn<T, T, false>(toMotionWeights, valueAppearance, nullptr, nullptr, nullptr, 1, 1, batch, dim,
        positions, dim, toMotion, stream);
}

template <typename T, typename TV>
int32_t prototypeMemoryRead(MemoryReadPlan const& plan, T const* features, T const* keys, T const* values,
    TV const* valid, T* out, int64_t batch, int64_t dim, int64_t positions, int64_t slots, int64_t tokens,
    float scale, float epsilon, void* workspace, cudaStream_t stream)
{
    float* slotValid = at(workspace, plan.slotValid);
    float* query = at(workspace, plan.query);
    float* weights = at(workspace, plan.weights);
    float* read = at(workspace, plan.read);
    int64_t const memoryTokens = slots * tokens;

    kernels::validity_kernel<TV><<<static_cast<unsigned>(ceilDiv(batch * slots, kElementwiseThreads)),
        kElementwiseThreads, 0, stream>>>(valid, batch * slots, slotValid);
    DPA_CHECK_LAUNCH();
    int32_t status
        = prototypes<T, float>(plan.prototypesPlan, features, batch, dim, positions, workspace, query, stream);
    if (status != DPA_STATUS_SUCCESS)
    {
        return status;
    }
    status = gemmNt<float, T, float, false>(
        plan.logits, query, keys, nullptr, batch, dim, memoryTokens, dim, scale, workspace, weights, stream);
    if (status != DPA_STATUS_SUCCESS)
    {
        return status;
    }
    dim3 const grid(static_cast<unsigned>(dim), static_cast<unsigned>(batch));
    kernels::row_softmax_kernel<false><<<grid, kRowThreads, 0, stream>>>(weights, weights, static_cast<int>(dim),
        static_cast<int>(memoryTokens), slotValid, static_cast<int>(tokens), static_cast<int>(slots));
    DPA_CHECK_LAUNCH();
    status = gemmNn<T, float, true>(
        weights, values, nullptr, nullptr, slotValid, tokens, slots, batch, dim, dim, memoryTokens, read, stream);
    if (status != DPA_STATUS_SUCCESS)
    {
        return status;
    }
    return correlation<T>(
        plan.correlation, read, features, batch, dim, dim, positions, epsilon, workspace, out, stream);
}

// Sizes the kernels index with int and launch over grid y/z (at most 65535 blocks).
bool sizesFit(int64_t batch, std::initializer_list<int64_t> sizes)
{
    if (batch < 0 || batch * kMaxSplits > kMaxGridYZ)
    {
        return false;
    }
    for (int64_t const size : sizes)
    {
        if (size < 1 || size > INT_MAX / 2 || ceilDiv(size, kTile) > kMaxGridYZ)
        {
            return false;
        }
    }
    return true;
}

bool knownDtype(int32_t dtype)
{
    return dtype == DPA_DTYPE_FLOAT32 || dtype == DPA_DTYPE_FLOAT16;
}

int32_t checkWorkspace(void const* workspace, size_t given, size_t needed)
{
    if (given < needed)
    {
        return DPA_STATUS_WORKSPACE_TOO_SMALL;
    }
    return (needed > 0 && workspace == nullptr) ? DPA_STATUS_INVALID_ARGUMENT : DPA_STATUS_SUCCESS;
}

} // namespace
} // namespace dpa

using dpa::sizesFit;

extern "C" {

int32_t dpa_abi_version(void)
{
    return DPA_KERNELS_ABI_VERSION;
}

char const* dpa_status_string(int32_t status)
{
    switch (status)
    {
    case DPA_STATUS_SUCCESS: return "success";
    case DPA_STATUS_INVALID_ARGUMENT: return "invalid argument";
    case DPA_STATUS_WORKSPACE_TOO_SMALL: return "workspace too small";
    case DPA_STATUS_CUDA_ERROR: return "CUDA error";
    default: return "unknown status";
    }
}

int32_t dpa_last_cuda_error(void)
{
    return dpa::gLastCudaError;
}

size_t dpa_prototypes_workspace_size(int64_t batch, int64_t channels, int64_t positions)
{
    if (!sizesFit(batch, {channels, positions}))
    {
        return 0;
    }
    dpa::WorkspaceLayout layout;
    dpa::PrototypesPlan const plan(layout, batch, channels, positions);
    return layout.size();
}

int32_t dpa_prototypes(void const* features, void* prototypes, int64_t batch, int64_t channels, int64_t positions,
    int32_t dtype, void* workspace, size_t workspace_size, cudaStream_t stream)
{
    if (!sizesFit(batch, {channels, positions}) || !dpa::knownDtype(dtype))
    {
        return DPA_STATUS_INVALID_ARGUMENT;
    }
    if (batch == 0)
    {
        return DPA_STATUS_SUCCESS;
    }
    if (features == nullptr || prototypes == nullptr)
    {
        return DPA_STATUS_INVALID_ARGUMENT;
    }
    dpa::WorkspaceLayout layout;
    dpa::PrototypesPlan const plan(layout, batch, channels, positions);
    int32_t const status = dpa::checkWorkspace(workspace, workspace_size, layout.size());
    if (status != DPA_STATUS_SUCCESS)
    {
        return status;
    }
    if (dtype == DPA_DTYPE_FLOAT16)
    {
        return dpa::prototypes<__half, __half>(plan, static_cast<__half const*>(features), batch, channels, positions,
            workspace, static_cast<__half*>(prototypes), stream);
    }
    return dpa::prototypes<float, float>(plan, static_cast<float const*>(features), batch, channels, positions,
        workspace, static_cast<float*>(prototypes), stream);
}

size_t dpa_prototype_correlation_workspace_size(int64_t batch, int64_t channels, int64_t positions)
{
    if (!sizesFit(batch, {channels, positions}))
    {
        return 0;
    }
    return dpa::PrototypeCorrelationPlan(batch, channels, positions).layout.size();
}

int32_t dpa_prototype_correlation(void const* features, void* correlation, int64_t batch, int64_t channels,
    int64_t positions, float epsilon, int32_t dtype, void* workspace, size_t workspace_size, cudaStream_t stream)
{
    if (!sizesFit(batch, {channels, positions}) || !dpa::knownDtype(dtype) || !(epsilon > 0.0F)
        || !std::isfinite(epsilon))
    {
        return DPA_STATUS_INVALID_ARGUMENT;
    }
    if (batch == 0)
    {
        return DPA_STATUS_SUCCESS;
    }
    if (features == nullptr || correlation == nullptr)
    {
        return DPA_STATUS_INVALID_ARGUMENT;
    }
    dpa::PrototypeCorrelationPlan const plan(batch, channels, positions);
    int32_t const status = dpa::checkWorkspace(workspace, workspace_size, plan.layout.size());
    if (status != DPA_STATUS_SUCCESS)
    {
        return status;
    }
    if (dtype == DPA_DTYPE_FLOAT16)
    {
        return dpa::prototypeCorrelation<__half>(plan, static_cast<__half const*>(features), batch, channels,
            positions, epsilon, workspace, static_cast<__half*>(correlation), stream);
    }
    return dpa::prototypeCorrelation<float>(plan, static_cast<float const*>(features), batch, channels, positions,
        epsilon, workspace, static_cast<float*>(correlation), stream);
}

size_t dpa_cross_modal_attention_workspace_size(int64_t batch, int64_t dim, int64_t positions)
{
    if (!sizesFit(batch, {dim, positions}))
    {
        return 0;
    }
    return dpa::CrossModalAttentionPlan(batch, dim, positions).layout.size();
}

int32_t dpa_cross_modal_attention(void const* key_appearance, void const* key_motion, void const* value_appearance,
    void const* value_motion, void* to_appearance, void* to_motion, int64_t batch, int64_t dim, int64_t positions,
    float scale, int32_t dtype, void* workspace, size_t workspace_size, cudaStream_t stream)
{
    if (!sizesFit(batch, {dim, positions}) || !dpa::knownDtype(dtype) || !std::isfinite(scale))
    {
        return DPA_STATUS_INVALID_ARGUMENT;
    }
    if (batch == 0)
    {
        return DPA_STATUS_SUCCESS;
    }
    if (key_appearance == nullptr || key_motion == nullptr || value_appearance == nullptr || value_motion == nullptr
        || to_appearance == nullptr || to_motion == nullptr)
    {
        return DPA_STATUS_INVALID_ARGUMENT;
    }
    dpa::CrossModalAttentionPlan const plan(batch, dim, positions);
    int32_t const status = dpa::checkWorkspace(workspace, workspace_size, plan.layout.size());
    if (status != DPA_STATUS_SUCCESS)
    {
        return status;
    }
    if (dtype == DPA_DTYPE_FLOAT16)
    {
        return dpa::crossModalAttention<__half>(plan, static_cast<__half const*>(key_appearance),
            static_cast<__half const*>(key_motion), static_cast<__half const*>(value_appearance),
            static_cast<__half const*>(value_motion), static_cast<__half*>(to_appearance),
            static_cast<__half*>(to_motion), batch, dim, positions, scale, workspace, stream);
    }
    return dpa::crossModalAttention<float>(plan, static_cast<float const*>(key_appearance),
        static_cast<float const*>(key_motion), static_cast<float const*>(value_appearance),
        static_cast<float const*>(value_motion), static_cast<float*>(to_appearance), static_cast<float*>(to_motion),
        batch, dim, positions, scale, workspace, stream);
}

size_t dpa_prototype_memory_read_workspace_size(
    int64_t batch, int64_t dim, int64_t positions, int64_t slots, int64_t tokens)
{
    if (!sizesFit(batch, {dim, positions, slots, tokens, slots * tokens}))
    {
        return 0;
    }
    return dpa::MemoryReadPlan(batch, dim, positions, slots, tokens).layout.size();
}

int32_t dpa_prototype_memory_read(void const* features, void const* memory_keys, void const* memory_values,
    void const* valid, void* correlation, int64_t batch, int64_t dim, int64_t positions, int64_t slots,
    int64_t tokens, float scale, float epsilon, int32_t dtype, int32_t valid_dtype, void* workspace,
    size_t workspace_size, cudaStream_t stream)
{
    if (!sizesFit(batch, {dim, positions, slots, tokens, slots * tokens}) || !dpa::knownDtype(dtype)
        || !dpa::knownDtype(valid_dtype) || !std::isfinite(scale) || !(epsilon > 0.0F) || !std::isfinite(epsilon))
    {
        return DPA_STATUS_INVALID_ARGUMENT;
    }
    if (batch == 0)
    {
        return DPA_STATUS_SUCCESS;
    }
    if (features == nullptr || memory_keys == nullptr || memory_values == nullptr || valid == nullptr
        || correlation == nullptr)
    {
        return DPA_STATUS_INVALID_ARGUMENT;
    }
    dpa::MemoryReadPlan const plan(batch, dim, positions, slots, tokens);
    int32_t const status = dpa::checkWorkspace(workspace, workspace_size, plan.layout.size());
    if (status != DPA_STATUS_SUCCESS)
    {
        return status;
    }
    if (dtype == DPA_DTYPE_FLOAT16)
    {
        auto const* x = static_cast<__half const*>(features);
        auto const* keys = static_cast<__half const*>(memory_keys);
        auto const* values = static_cast<__half const*>(memory_values);
        auto* out = static_cast<__half*>(correlation);
        if (valid_dtype == DPA_DTYPE_FLOAT16)
        {
            return dpa::prototypeMemoryRead<__half, __half>(plan, x, keys, values,
                static_cast<__half const*>(valid), out, batch, dim, positions, slots, tokens, scale, epsilon,
                workspace, stream);
        }
        return dpa::prototypeMemoryRead<__half, float>(plan, x, keys, values, static_cast<float const*>(valid), out,
            batch, dim, positions, slots, tokens, scale, epsilon, workspace, stream);
    }
    auto const* x = static_cast<float const*>(features);
    auto const* keys = static_cast<float const*>(memory_keys);
    auto const* values = static_cast<float const*>(memory_values);
    auto* out = static_cast<float*>(correlation);
    if (valid_dtype == DPA_DTYPE_FLOAT16)
    {
        return dpa::prototypeMemoryRead<float, __half>(plan, x, keys, values, static_cast<__half const*>(valid), out,
            batch, dim, positions, slots, tokens, scale, epsilon, workspace, stream);
    }
    return dpa::prototypeMemoryRead<float, float>(plan, x, keys, values, static_cast<float const*>(valid), out, batch,
        dim, positions, slots, tokens, scale, epsilon, workspace, stream);
}

} // extern "C"
