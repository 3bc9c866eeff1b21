/*
 * Host emulation of the CUDA subset that export/plugins/dpa_kernels.cu and dpa_kernels.cuh use, so that a host
 * C++ compiler builds them and their logic can be tested without a GPU. ../README.md says what this checks
 * and what it cannot.
 *
 * Execution: a launch runs at once, block after block, on the calling thread. Each CUDA thread of a block is a
 * fiber (ucontext, its own stack) that runs until it reaches a barrier (__syncthreads, or a warp shuffle,
 * which is a barrier of its warp) and then hands over to the next fiber in thread order (reverse order after
 * setReverseThreadOrder(true)). A missing barrier therefore shows, reproducibly, as a thread reading shared
 * memory that another thread has not written yet.
 *
 * Provided: __global__, __device__, __forceinline__, __launch_bounds__ (dropped); __shared__ (a static local:
 * one block runs at a time); threadIdx, blockIdx, blockDim, gridDim; __syncthreads (waits for the threads that
 * have not exited, as the hardware does); __shfl_xor_sync on float over a whole warp; min(int, int); dim3,
 * uint3, float2, make_float2; __half with __half2float and __float2half_rn (IEEE binary16, round to nearest
 * even); cudaStream_t (ignored: a launch has finished when it returns); cudaError_t and cudaGetLastError; and
 * the launch, `kernel<<<grid, block, shared, stream>>>(args)` spelled
 * `kernel | cuda_emulation::LaunchConfiguration(grid, block, shared, stream)(args)`: no host compiler parses
 * `<<<`, so the build rewrites that (and only that) in dpa_kernels.cu. Anything else a kernel uses fails to
 * compile: add it here.
 *
 * Errors, returned by the next cudaGetLastError (text: errorMessage()): a launch configuration CUDA rejects,
 * dynamic shared memory, a shuffle without every lane of its warp, a thread exiting while its warp waits in a
 * shuffle, and a deadlock (threads waiting at barriers that the others never reach). The first error stops
 * the launch, and later launches do nothing until cudaGetLastError has returned it.
 */
#ifndef CUDA_HOST_EMULATION_H
#define CUDA_HOST_EMULATION_H

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

// --- Keywords --------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static // one block at a time: a static local is that block's shared memory

// --- Types -----------------------------------------------------------------------------------------------

struct uint3
{
    unsigned int x, y, z;
};

struct dim3
{
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_)
        , y(y_)
        , z(z_)
    {
    }
};

struct alignas(8) float2
{
    float x, y;
};

inline float2 make_float2(float x, float y)
{
    return float2{x, y};
}

inline int min(int a, int b)
{
    return a < b ? a : b;
}

struct __half
{
    uint16_t bits;
};

inline float __half2float(__half value)
{
    uint32_t const sign = static_cast<uint32_t>(value.bits & 0x8000U) << 16;
    uint32_t const exponent = (value.bits >> 10) & 0x1FU;
    uint32_t const mantissa = value.bits & 0x3FFU;
    if (exponent == 0) // zero or subnormal: mantissa * 2^-24, exact in float
    {
        float const magnitude = std::ldexp(static_cast<float>(mantissa), -24);
        return sign != 0 ? -magnitude : magnitude;
    }
    uint32_t bits = sign | (mantissa << 13);
    bits |= exponent == 0x1FU ? 0x7F800000U : (exponent + 112U) << 23; // Inf / NaN, or rebias 15 -> 127
    float result;
    std::memcpy(&result, &bits, sizeof(result));
    return result;
}

inline __half __float2half_rn(float value)
{
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    auto const sign = static_cast<uint16_t>((bits >> 16) & 0x8000U);
    uint32_t const magnitude = bits & 0x7FFFFFFFU;
    if (magnitude > 0x7F800000U)
    {
        return __half{static_cast<uint16_t>(sign | 0x7E00U)}; // NaN
    }
    if (magnitude >= 0x477FF000U) // >= 65520 rounds to Inf
    {
        return __half{static_cast<uint16_t>(sign | 0x7C00U)};
    }
    if (magnitude >= 0x38800000U) // normal (>= 2^-14): round the mantissa to 10 bits, nearest even
    {
        uint32_t const rounded = magnitude + 0xFFFU + ((magnitude >> 13) & 1U);
        return __half{static_cast<uint16_t>(sign | ((rounded - 0x38000000U) >> 13))};
    }
    // Subnormal or zero: a multiple of 2^-24; nearbyint rounds to nearest even (1024 is the smallest normal).
    auto const units = static_cast<uint16_t>(std::nearbyint(std::ldexp(std::fabs(value), 24)));
    return __half{static_cast<uint16_t>(sign | units)};
}

// --- Runtime API -----------------------------------------------------------------------------------------

typedef struct CUstream_st* cudaStream_t;

enum cudaError
{
    cudaSuccess = 0,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorLaunchFailure = 719
};
typedef enum cudaError cudaError_t;

// --- Built-in variables: the running thread's, set by the scheduler before it resumes a fiber -------------

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace cuda_emulation
{

constexpr unsigned kWarpSize = 32;
constexpr size_t kFiberStackBytes = 256 * 1024;

// Arrival counter of a barrier among the live (not exited) threads of a group: the block or a warp.
struct Barrier
{
    unsigned live{0};
    unsigned arrived{0};
    unsigned generation{0};

    void release()
    {
        arrived = 0;
        ++generation;
    }
};

struct Warp
{
    Barrier barrier;
    unsigned size{0};
    float lanes[2][kWarpSize]{}; // shuffle values, double-buffered by barrier generation
};

struct Fiber
{
    ucontext_t context{};
    void* stackBase{nullptr}; // mmap'ed: a guard page, then kFiberStackBytes
    uint3 index{};
    unsigned linear{0};
    bool exited{false};
    Barrier const* waitingOn{nullptr};
    unsigned waitedGeneration{0};

    bool runnable() const
    {
        return !exited && (waitingOn == nullptr || waitingOn->generation != waitedGeneration);
    }
};

// The emulated device: the fibers of the running block, its barriers, the sticky error state.
struct Device
{
    ucontext_t launchContext{}; // the launching code, resumed when the block has finished or failed
    std::vector<Fiber> fibers;
    unsigned threads{0}; // of the running block
    std::vector<Warp> warps;
    Barrier block;
    Fiber* current{nullptr};
    std::function<void()> const* body{nullptr};
    bool reverseOrder{false};
    cudaError_t lastError{cudaSuccess};
    bool failed{false};
    std::string message;
};

inline Device device;

// The first error of a launch stops it; cudaGetLastError returns it once, errorMessage() keeps the text.
inline void fail(cudaError_t error, std::string const& text)
{
    if (!device.failed)
    {
        device.failed = true;
        device.lastError = error;
        device.message = text;
    }
}

inline std::string const& errorMessage()
{
    return device.message;
}

inline void setReverseThreadOrder(bool reverse)
{
    device.reverseOrder = reverse;
}

// The first runnable fiber after thread `linear` in resume order, wrapping round (itself last); null if none.
inline Fiber* nextRunnable(unsigned linear)
{
    unsigned const count = device.threads;
    for (unsigned step = 1; step <= count; ++step)
    {
        unsigned const next = device.reverseOrder ? (linear + count - step) % count : (linear + step) % count;
        if (device.fibers[next].runnable())
        {
            return &device.fibers[next];
        }
    }
    return nullptr;
}

// Hand over to the next runnable fiber, or back to the launch when there is none (block done, error or
// deadlock); returns when `self` is resumed. The fences keep the compiler from caching shared memory across.
inline void switchFrom(Fiber& self)
{
    Fiber* const next = device.failed ? nullptr : nextRunnable(self.linear);
    if (next == &self)
    {
        return;
    }
    std::atomic_signal_fence(std::memory_order_seq_cst);
    if (next == nullptr)
    {
        if (device.block.live > 0)
        {
            fail(cudaErrorLaunchFailure,
                "deadlock: threads wait at a __syncthreads or shuffle that the other threads never reach");
        }
        swapcontext(&self.context, &device.launchContext);
    }
    else
    {
        threadIdx = next->index;
        device.current = next;
        swapcontext(&self.context, &next->context);
    }
    std::atomic_signal_fence(std::memory_order_seq_cst);
}

// Arrive at `barrier` and wait until every live thread of its group has arrived. Returns the generation.
inline unsigned arriveAndWait(Barrier& barrier)
{
    Fiber& self = *device.current;
    unsigned const generation = barrier.generation;
    if (++barrier.arrived == barrier.live)
    {
        barrier.release();
    }
    self.waitingOn = &barrier;
    self.waitedGeneration = generation;
    switchFrom(self);
    self.waitingOn = nullptr;
    return generation;
}

inline void exitThread(Fiber& fiber)
{
    fiber.exited = true;
    Warp& warp = device.warps[fiber.linear / kWarpSize];
    if (warp.barrier.arrived > 0)
    {
        fail(cudaErrorLaunchFailure, "a thread exited while lanes of its warp wait in a shuffle");
    }
    --warp.barrier.live;
    if (--device.block.live > 0 && device.block.arrived == device.block.live)
    {
        device.block.release();
    }
}

inline void fiberMain()
{
    Fiber& self = *device.current;
    (*device.body)();
    exitThread(self);
    switchFrom(self); // an exited fiber is never resumed
}

inline void* allocateStack()
{
    size_t const page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* base = mmap(nullptr, page + kFiberStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || mprotect(base, page, PROT_NONE) != 0) // guard page: overflow faults
    {
        return nullptr;
    }
    return base;
}

// Run the block blockIdx of `threads` threads to completion (or to the first error).
inline void runBlock(dim3 block, unsigned threads)
{
    size_t const page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    while (device.fibers.size() < threads)
    {
        device.fibers.emplace_back();
        device.fibers.back().stackBase = allocateStack();
        if (device.fibers.back().stackBase == nullptr)
        {
            device.fibers.pop_back();
            fail(cudaErrorLaunchFailure, "cannot allocate fiber stacks");
            return;
        }
    }
    device.threads = threads;
    device.block = Barrier{threads, 0, 0};
    device.warps.assign((threads + kWarpSize - 1) / kWarpSize, Warp{});
    for (unsigned w = 0; w < device.warps.size(); ++w)
    {
        device.warps[w].size = std::min(kWarpSize, threads - w * kWarpSize);
        device.warps[w].barrier.live = device.warps[w].size;
    }
    for (unsigned t = 0; t < threads; ++t)
    {
        Fiber& fiber = device.fibers[t];
        fiber.linear = t;
        fiber.index = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        fiber.exited = false;
        fiber.waitingOn = nullptr;
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = static_cast<char*>(fiber.stackBase) + page;
        fiber.context.uc_stack.ss_size = kFiberStackBytes;
        fiber.context.uc_link = &device.launchContext;
        makecontext(&fiber.context, fiberMain, 0);
    }
    Fiber& first = device.fibers[device.reverseOrder ? threads - 1 : 0];
    threadIdx = first.index;
    device.current = &first;
    swapcontext(&device.launchContext, &first.context);
    device.current = nullptr;
}

inline bool validConfiguration(dim3 grid, dim3 block)
{
    unsigned long long const threads = 1ULL * block.x * block.y * block.z;
    return grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535 && threads >= 1
        && threads <= 1024 && block.x <= 1024 && block.y <= 1024 && block.z <= 64;
}

template <typename... Args>
struct PendingLaunch;

// `<<<grid, block, sharedBytes, stream>>>`; calling it with the kernel arguments gives a PendingLaunch.
struct LaunchConfiguration
{
    dim3 grid;
    dim3 block;
    size_t sharedBytes;

    LaunchConfiguration(dim3 grid_, dim3 block_, size_t sharedBytes_ = 0, cudaStream_t = nullptr)
        : grid(grid_)
        , block(block_)
        , sharedBytes(sharedBytes_)
    {
    }

    template <typename... Args>
    PendingLaunch<Args...> operator()(Args... args) const
    {
        return PendingLaunch<Args...>{*this, std::tuple<Args...>(args...)};
    }
};

template <typename... Args>
struct PendingLaunch
{
    LaunchConfiguration configuration;
    std::tuple<Args...> arguments;
};

// kernel | LaunchConfiguration(...)(args): runs every block of the grid now. Errors go to cudaGetLastError.
template <typename... Params, typename... Args>
void operator|(void (*kernel)(Params...), PendingLaunch<Args...> const& launch)
{
    static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
    LaunchConfiguration const& configuration = launch.configuration;
    if (device.failed)
    {
        return; // a launch failure is sticky until cudaGetLastError
    }
    if (!validConfiguration(configuration.grid, configuration.block))
    {
        fail(cudaErrorInvalidConfiguration, "invalid launch configuration");
        return;
    }
    if (configuration.sharedBytes != 0)
    {
        fail(cudaErrorInvalidConfiguration, "dynamic shared memory is not emulated");
        return;
    }
    std::tuple<Params...> const parameters = std::make_from_tuple<std::tuple<Params...>>(launch.arguments);
    std::function<void()> const body = [&] { std::apply(kernel, parameters); };
    device.body = &body;
    blockDim = configuration.block;
    gridDim = configuration.grid;
    unsigned const threads = configuration.block.x * configuration.block.y * configuration.block.z;
    for (unsigned z = 0; z < gridDim.z && !device.failed; ++z)
    {
        for (unsigned y = 0; y < gridDim.y && !device.failed; ++y)
        {
            for (unsigned x = 0; x < gridDim.x && !device.failed; ++x)
            {
                blockIdx = uint3{x, y, z};
                runBlock(configuration.block, threads);
            }
        }
    }
    device.body = nullptr;
}

} // namespace cuda_emulation

inline cudaError_t cudaGetLastError()
{
    cudaError_t const error = cuda_emulation::device.lastError;
    cuda_emulation::device.lastError = cudaSuccess;
    cuda_emulation::device.failed = false;
    return error;
}

// --- Device functions ------------------------------------------------------------------------------------

inline void __syncthreads()
{
    cuda_emulation::arriveAndWait(cuda_emulation::device.block);
}

// value of lane (this lane ^ laneMask); every lane of the warp must take part (mask = all its lanes).
inline float __shfl_xor_sync(unsigned mask, float value, int laneMask)
{
    using namespace cuda_emulation;
    Fiber& fiber = *device.current;
    Warp& warp = device.warps[fiber.linear / kWarpSize];
    unsigned const lane = fiber.linear % kWarpSize;
    unsigned const warpLanes = warp.size == kWarpSize ? 0xFFFFFFFFU : (1U << warp.size) - 1U;
    if ((mask & warpLanes) != warpLanes || warp.barrier.live != warp.size)
    {
        fail(cudaErrorLaunchFailure, "__shfl_xor_sync without every lane of the warp");
        switchFrom(fiber); // never resumed: the launch stops at the first error
    }
    warp.lanes[warp.barrier.generation & 1U][lane] = value;
    unsigned const generation = arriveAndWait(warp.barrier);
    unsigned const source = lane ^ static_cast<unsigned>(laneMask);
    return source < warp.size ? warp.lanes[generation & 1U][source] : value;
}

#endif // CUDA_HOST_EMULATION_H
