/*
 * Device kernels of the DPA prototype-attention ops (templates over the I/O type: float or __half).
 *
 * Building blocks, composed per op in dpa_kernels.cu:
 *   row_softmax_stats_kernel  (max, 1/sum) of each row of a (rows, len) matrix, one block per row;
 *   gemm_nt_kernel            C = alpha * op(A) B^T over a long shared axis (the HW positions or the
 *                             feature axis), op(A) optionally the softmax of A's rows from those stats;
 *                             32x32 output tiles, shared-memory K tiles, optional deterministic split-K;
 *   splitk_reduce_kernel      sums the split-K partials in a fixed order;
 *   gemm_nn_kernel            C = diag(r) A B diag(c) with A float32 (a workspace matrix), B (K, N)
 *                             optionally with whole K-rows masked out (invalid memory slots);
 *   row_softmax_kernel        softmax of the rows (or columns) of a float32 workspace matrix, with an
 *                             optional slot mask (masked entries get weight exactly 0);
 *   row_inverse_norm_kernel / column_inverse_norm_kernel  1 / max(||x||_2, epsilon).
 * All arithmetic is float32; exp is the accurate expf (not __expf).
 */
#ifndef DPA_KERNELS_CUH
#define DPA_KERNELS_CUH

#include <cmath>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace dpa
{
namespace kernels
{

constexpr int kTile = 32;                  // output tile edge and K-tile depth of the GEMMs
constexpr int kTileRows = 8;               // thread rows of a GEMM block; kTile / kTileRows outputs per thread
constexpr int kGemmThreads = kTile * kTileRows;
constexpr int kRowThreads = 256;           // threads of the one-block-per-row kernels
constexpr int kWarpSize = 32;

__device__ __forceinline__ float toFloat(float value)
{
    return value;
}

__device__ __forceinline__ float toFloat(__half value)
{
    return __half2float(value);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float value);

template <>
__device__ __forceinline__ float fromFloat<float>(float value)
{
    return value;
}

template <>
__device__ __forceinline__ __half fromFloat<__half>(float value)
{
    return __float2half_rn(value);
}

// Running softmax statistics: x = maximum, y = sum of exp(v - maximum). y == 0 means "no element".
__device__ __forceinline__ float2 combineSoftmaxStats(float2 a, float2 b)
{
    if (a.x < b.x)
    {
        float2 const swap = a;
        a = b;
        b = swap;
    }
    if (b.y == 0.0F)
    {
        return a;
    }
    return make_float2(a.x, a.y + b.y * expf(b.x - a.x));
}

__device__ __forceinline__ float2 warpSoftmaxStats(float2 stats)
{
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    {
        float2 other;
        other.x = __shfl_xor_sync(0xffffffffU, stats.x, offset);
        other.y = __shfl_xor_sync(0xffffffffU, stats.y, offset);
        stats = combineSoftmaxStats(stats, other);
    }
    return stats;
}

__device__ __forceinline__ float warpSum(float value)
{
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    {
        value += __shfl_xor_sync(0xffffffffU, value, offset);
    }
    return value;
}

__device__ __forceinline__ float warpMax(float value)
{
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    {
        value = fmaxf(value, __shfl_xor_sync(0xffffffffU, value, offset));
    }
    return value;
}

// Block-wide reductions for kRowThreads threads; every thread gets the result.
__device__ __forceinline__ float blockSum(float value)
{
    __shared__ float partial[kRowThreads / kWarpSize];
    int const warp = threadIdx.x / kWarpSize;
    int const lane = threadIdx.x % kWarpSize;
    value = warpSum(value);
    __syncthreads();
    if (lane == 0)
    {
        partial[warp] = value;
    }
    __syncthreads();
    value = lane < kRowThreads / kWarpSize ? partial[lane] : 0.0F;
    return warpSum(value);
}

__device__ __forceinline__ float blockMax(float value)
{
    __shared__ float partial[kRowThreads / kWarpSize];
    int const warp = threadIdx.x / kWarpSize;
    int const lane = threadIdx.x % kWarpSize;
    value = warpMax(value);
    __syncthreads();
    if (lane == 0)
    {
        partial[warp] = value;
    }
    __syncthreads();
    value = lane < kRowThreads / kWarpSize ? partial[lane] : -INFINITY;
    return warpMax(value);
}

// stats[row] = (max_p x[row, p], 1 / sum_p exp(x[row, p] - max)). Grid: one block per row.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    row_softmax_stats_kernel(T const* __restrict__ x, int len, float2* __restrict__ stats)
{
    T const* row = x + static_cast<int64_t>(blockIdx.x) * len;
    float2 local = make_float2(-INFINITY, 0.0F);
    for (int p = threadIdx.x; p < len; p += kRowThreads)
    {
        float const value = toFloat(row[p]);
        if (value > local.x)
        {
            local.y = local.y * expf(local.x - value) + 1.0F;
            local.x = value;
        }
        else
        {
            local.y += expf(value - local.x);
        }
    }
    local = warpSoftmaxStats(local);
    __shared__ float2 partial[kRowThreads / kWarpSize];
    int const warp = threadIdx.x / kWarpSize;
    int const lane = threadIdx.x % kWarpSize;
    if (lane == 0)
    {
        partial[warp] = local;
    }
    __syncthreads();
    if (warp == 0)
    {
        local = lane < kRowThreads / kWarpSize ? partial[lane] : make_float2(-INFINITY, 0.0F);
        local = warpSoftmaxStats(local);
        if (lane == 0)
        {
            stats[blockIdx.x] = make_float2(local.x, 1.0F / local.y);
        }
    }
}

/*
 * C[b, m, n] = alpha * sum_k op(A)[b, m, k] * B[b, n, k]   (A: (M, K), B: (N, K), C: (M, N), row-major)
 * op(A) = A, or with kSoftmaxA the row softmax exp(A[m, k] - stats[b*M + m].x) * stats[b*M + m].y.
 * Grid: (ceil(N / 32), ceil(M / 32), batch * splits); block (32, 8). blockIdx.z = b * splits + split covers
 * k in [split * kChunk, (split + 1) * kChunk). With `partial` set, writes the unscaled float32 partial sum
 * to partial[(split * batch + b) * M * N + m * N + n] (then splitk_reduce_kernel); else alpha * sum to out.
 */
template <typename TA, typename TB, typename TO, bool kSoftmaxA>
__global__ void __launch_bounds__(kGemmThreads) gemm_nt_kernel(TA const* __restrict__ a, TB const* __restrict__ b,
    float2 const* __restrict__ aStats, int m, int n, int k, int batch, int splits, int kChunk, float alpha,
    float* __restrict__ partial, TO* __restrict__ out)
{
    __shared__ float aTile[kTile][kTile + 1];
    __shared__ float bTile[kTile][kTile + 1];
    int const item = blockIdx.z / splits;
    int const split = blockIdx.z % splits;
    int const m0 = blockIdx.y * kTile;
    int const n0 = blockIdx.x * kTile;
    int const kBegin = split * kChunk;
    int const kEnd = min(k, kBegin + kChunk);
    TA const* aItem = a + static_cast<int64_t>(item) * m * k;
    TB const* bItem = b + static_cast<int64_t>(item) * n * k;
    int const thread = threadIdx.y * kTile + threadIdx.x;

    float accumulator[kTile / kTileRows] = {};
    for (int k0 = kBegin; k0 < kEnd; k0 += kTile)
    {
        for (int index = thread; index < kTile * kTile; index += kGemmThreads)
        {
            int const row = index / kTile;
            int const column = index % kTile;
            int const kk = k0 + column;
            float aValue = 0.0F;
            if (m0 + row < m && kk < kEnd)
            {
                aValue = toFloat(aItem[static_cast<int64_t>(m0 + row) * k + kk]);
                if (kSoftmaxA)
                {
                    float2 const stats = aStats[static_cast<int64_t>(item) * m + m0 + row];
                    aValue = expf(aValue - stats.x) * stats.y;
                }
            }
            aTile[row][column] = aValue;
            bTile[row][column]
                = (n0 + row < n && kk < kEnd) ? toFloat(bItem[static_cast<int64_t>(n0 + row) * k + kk]) : 0.0F;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < kTile; ++kk)
        {
            float const bValue = bTile[threadIdx.x][kk];
#pragma unroll
            for (int i = 0; i < kTile / kTileRows; ++i)
            {
                accumulator[i] = fmaf(aTile[threadIdx.y + i * kTileRows][kk], bValue, accumulator[i]);
            }
        }
        __syncthreads();
    }

    int const column = n0 + threadIdx.x;
    if (column >= n)
    {
        return;
    }
#pragma unroll
    for (int i = 0; i < kTile / kTileRows; ++i)
    {
        int const row = m0 + threadIdx.y + i * kTileRows;
        if (row < m)
        {
            int64_t const offset = static_cast<int64_t>(row) * n + column;
            if (partial != nullptr)
            {
                partial[(static_cast<int64_t>(split) * batch + item) * m * n + offset] = accumulator[i];
            }
            else
            {
                out[static_cast<int64_t>(item) * m * n + offset] = fromFloat<TO>(alpha * accumulator[i]);
            }
        }
    }
}

// out[i] = alpha * sum_s partial[s * count + i], summed in split order (deterministic).
template <typename TO>
__global__ void splitk_reduce_kernel(
    float const* __restrict__ partial, int splits, int64_t count, float alpha, TO* __restrict__ out)
{
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        float sum = 0.0F;
        for (int s = 0; s < splits; ++s)
        {
            sum += partial[s * count + i];
        }
        out[i] = fromFloat<TO>(alpha * sum);
    }
}

/*
 * C[b, m, n] = rowScale[b*M + m] * colScale[b*N + n] * sum_k A[b, m, k] * B[b, k, n]
 * A float32 (M, K), B (K, N), C (M, N), row-major; rowScale / colScale may be null (1).
 * With kMaskRowsOfB, row k of B is read only if slotValid[b * slots + k / tokensPerSlot] != 0 (else 0).
 * Grid: (ceil(N / 32), ceil(M / 32), batch); block (32, 8).
 */
template <typename TB, typename TO, bool kMaskRowsOfB>
__global__ void __launch_bounds__(kGemmThreads) gemm_nn_kernel(float const* __restrict__ a, TB const* __restrict__ b,
    float const* __restrict__ rowScale, float const* __restrict__ colScale, float const* __restrict__ slotValid,
    int tokensPerSlot, int slots, int m, int n, int k, TO* __restrict__ out)
{
    __shared__ float aTile[kTile][kTile + 1];
    __shared__ float bTile[kTile][kTile + 1];
    int const item = blockIdx.z;
    int const m0 = blockIdx.y * kTile;
    int const n0 = blockIdx.x * kTile;
    float const* aItem = a + static_cast<int64_t>(item) * m * k;
    TB const* bItem = b + static_cast<int64_t>(item) * k * n;
    int const thread = threadIdx.y * kTile + threadIdx.x;

    float accumulator[kTile / kTileRows] = {};
    for (int k0 = 0; k0 < k; k0 += kTile)
    {
        for (int index = thread; index < kTile * kTile; index += kGemmThreads)
        {
            int const row = index / kTile;
            int const column = index % kTile;
            aTile[row][column]
                = (m0 + row < m && k0 + column < k) ? aItem[static_cast<int64_t>(m0 + row) * k + k0 + column] : 0.0F;
            bool readB = k0 + row < k && n0 + column < n;
            if (kMaskRowsOfB && readB)
            {
                readB = slotValid[static_cast<int64_t>(item) * slots + (k0 + row) / tokensPerSlot] != 0.0F;
            }
            bTile[row][column] = readB ? toFloat(bItem[static_cast<int64_t>(k0 + row) * n + n0 + column]) : 0.0F;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < kTile; ++kk)
        {
            float const bValue = bTile[kk][threadIdx.x];
#pragma unroll
            for (int i = 0; i < kTile / kTileRows; ++i)
            {
                accumulator[i] = fmaf(aTile[threadIdx.y + i * kTileRows][kk], bValue, accumulator[i]);
            }
        }
        __syncthreads();
    }

    int const column = n0 + threadIdx.x;
    if (column >= n)
    {
        return;
    }
    float const columnFactor = colScale != nullptr ? colScale[static_cast<int64_t>(item) * n + column] : 1.0F;
#pragma unroll
    for (int i = 0; i < kTile / kTileRows; ++i)
    {
        int const row = m0 + threadIdx.y + i * kTileRows;
        if (row < m)
        {
            float const rowFactor = rowScale != nullptr ? rowScale[static_cast<int64_t>(item) * m + row] : 1.0F;
            out[(static_cast<int64_t>(item) * m + row) * n + column]
                = fromFloat<TO>(accumulator[i] * rowFactor * columnFactor);
        }
    }
}

/*
 * out[b, i, j] = softmax over j of in(b, i, j), for float32 matrices of `rows` rows of `len` entries;
 * in(b, i, j) = in[b, i, j], or in[b, j, i] with kTranspose (then in is (len, rows) per item).
 * With slotValid, entry j takes part only if slotValid[b * slots + j / tokensPerSlot] != 0; the others get
 * weight exactly 0, and a row without any valid entry becomes all zeros. In place (in == out) is allowed
 * without kTranspose. Grid: (rows, batch), kRowThreads threads.
 */
template <bool kTranspose>
__global__ void __launch_bounds__(kRowThreads) row_softmax_kernel(float const* in, float* out, int rows, int len,
    float const* __restrict__ slotValid, int tokensPerSlot, int slots)
{
    int const item = blockIdx.y;
    int const row = blockIdx.x;
    float const* matrix = in + static_cast<int64_t>(item) * rows * len;
    float* outRow = out + (static_cast<int64_t>(item) * rows + row) * len;
    float const* itemValid = slotValid != nullptr ? slotValid + static_cast<int64_t>(item) * slots : nullptr;
    auto load = [&](int j)
    { return kTranspose ? matrix[static_cast<int64_t>(j) * rows + row] : matrix[static_cast<int64_t>(row) * len + j]; };
    auto valid = [&](int j) { return itemValid == nullptr || itemValid[j / tokensPerSlot] != 0.0F; };

    float maximum = -INFINITY;
    for (int j = threadIdx.x; j < len; j += kRowThreads)
    {
        if (valid(j))
        {
            maximum = fmaxf(maximum, load(j));
        }
    }
    maximum = blockMax(maximum);
    float sum = 0.0F;
    for (int j = threadIdx.x; j < len; j += kRowThreads)
    {
        if (valid(j))
        {
            sum += expf(load(j) - maximum);
        }
    }
    sum = blockSum(sum);
    float const inverse = sum > 0.0F ? 1.0F / sum : 0.0F;
    for (int j = threadIdx.x; j < len; j += kRowThreads)
    {
        outRow[j] = valid(j) ? expf(load(j) - maximum) * inverse : 0.0F;
    }
}

// inverse[r] = 1 / max(||x[r, :]||_2, epsilon) for `rows` float32 rows of `len`. One warp per row.
__global__ void row_inverse_norm_kernel(
    float const* __restrict__ x, int64_t rows, int len, float epsilon, float* __restrict__ inverse)
{
    int64_t const row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize;
    int const lane = threadIdx.x % kWarpSize;
    if (row >= rows)
    {
        return;
    }
    float sum = 0.0F;
    for (int j = lane; j < len; j += kWarpSize)
    {
        float const value = x[row * len + j];
        sum = fmaf(value, value, sum);
    }
    sum = warpSum(sum);
    if (lane == 0)
    {
        inverse[row] = 1.0F / fmaxf(sqrtf(sum), epsilon);
    }
}

// inverse[b, p] = 1 / max(||x[b, :, p]||_2, epsilon) for x (B, C, HW). Grid: (ceil(HW / blockDim), B).
template <typename T>
__global__ void column_inverse_norm_kernel(
    T const* __restrict__ x, int channels, int positions, float epsilon, float* __restrict__ inverse)
{
    int const p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= positions)
    {
        return;
    }
    T const* column = x + static_cast<int64_t>(blockIdx.y) * channels * positions + p;
    float sum = 0.0F;
    for (int c = 0; c < channels; ++c)
    {
        float const value = toFloat(column[static_cast<int64_t>(c) * positions]);
        sum = fmaf(value, value, sum);
    }
    inverse[static_cast<int64_t>(blockIdx.y) * positions + p] = 1.0F / fmaxf(sqrtf(sum), epsilon);
}

// out[i] = (in[i] != 0) as float32 (validity mask of any I/O type).
template <typename T>
__global__ void validity_kernel(T const* __restrict__ in, int64_t count, float* __restrict__ out)
{
    int64_t const i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i < count)
    {
        out[i] = toFloat(in[i]) != 0.0F ? 1.0F : 0.0F;
    }
}

} // namespace kernels
} // namespace dpa

#endif // DPA_KERNELS_CUH
