// The CUDA plugin's own sources, built as host C++ against engine/ops/cuda/emulation.h: a
// luatron_cuda.so stand-in whose kernels run on the CPU, so ops_emulated_test can check the plugin's
// launchers, kernels, allocator and table on machines without a GPU. One translation unit: the
// families' internal names do not collide.
#include "engine/ops/cuda/memory.cu"
#include "engine/ops/cuda/elementwise.cu"
#include "engine/ops/cuda/norm.cu"
#include "engine/ops/cuda/embedding.cu"
#include "engine/ops/cuda/moe.cu"
#include "engine/ops/cuda/linear.cu"
#include "engine/ops/cuda/attention.cu"
#include "engine/ops/cuda/attention_tc.cu"
#include "engine/ops/cuda/attention_kv.cu"
#include "engine/ops/cuda/rope.cu"
#include "engine/ops/cuda/cross_entropy.cu"
#include "engine/ops/cuda/profile.cu"
#include "engine/ops/cuda/nccl.cu"  // a stub under the emulator: "NCCL is not available under the emulator"
#include "engine/ops/cuda/backend.cu"
