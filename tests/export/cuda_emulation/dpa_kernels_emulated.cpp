/*
 * export/plugins/dpa_kernels.cu, and through it dpa_kernels.cuh, compiled by a host C++ compiler against the
 * CUDA host emulation (include/), plus the emulation's controls for the tests. Built by
 * tests/export/test_kernels_emulated.py into a shared library with the same C ABI as libdpa_plugins.so.
 */
#include "cuda_host_emulation.h"

// The build writes dpa_kernels.cu into its own folder with each launch `<<<config>>>` spelled
// `| ::cuda_emulation::LaunchConfiguration(config)` and a #line directive, so diagnostics name the original
// file and lines; dpa_kernels.cuh is included from export/plugins unchanged.
#include "dpa_kernels_launches_rewritten.cu"

extern "C" {

// The message of the last emulation error (a failed launch); empty if none.
DPA_API char const* cuda_emulation_error_message(void)
{
    return cuda_emulation::errorMessage().c_str();
}

// Nonzero: fibers resume in reverse thread order (a missing barrier then shows from the other side).
DPA_API void cuda_emulation_set_reverse_thread_order(int32_t reverse)
{
    cuda_emulation::setReverseThreadOrder(reverse != 0);
}

} // extern "C"
