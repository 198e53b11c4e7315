// The portable build of the CPU kernels (baseline x86-64 or any other architecture).
#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"
