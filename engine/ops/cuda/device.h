/* The CUDA backend's entry points (compiled by nvcc; linked only into targets that ask for it,
 * so a CPU-only build and run never need a GPU or its driver). */
#ifndef LT_CUDA_DEVICE_H
#define LT_CUDA_DEVICE_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Number of usable GPUs; 0 with the reason in err when there is no driver or no device
 * (cudaErrorInsufficientDriver / cudaErrorNoDevice: "no GPU here", never an abort). */
int lt_cuda_device_count(char *err, size_t errlen);
/* "NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB" for device d. */
int lt_cuda_device_describe(int d, char *out, size_t outlen);

/* AdamW on device memory, the same formula as the CPU kernel (engine/ops/ops.h). */
int lt_cuda_adamw_update(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, int64_t n, float lr,
                         float beta1, float beta2, float eps, float weight_decay, int64_t step, char *err,
                         size_t errlen);
/* Host <-> device copies and allocation, for tests and the tensor layer to come. */
void *lt_cuda_malloc(size_t nbytes, char *err, size_t errlen);
void lt_cuda_free(void *p);
int lt_cuda_copy(void *dst, const void *src, size_t nbytes, int to_device, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
