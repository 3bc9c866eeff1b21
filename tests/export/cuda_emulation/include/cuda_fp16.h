/* Stand-in for the CUDA toolkit header of the same name: the host emulation (cuda_host_emulation.h). */
#include "cuda_host_emulation.h"
