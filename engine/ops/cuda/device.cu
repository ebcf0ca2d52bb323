// First piece of the CUDA backend: device discovery that degrades to "no GPU", and the AdamW
// kernel (one thread per element, the CPU kernel's formula).
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>

#include "engine/ops/cuda/device.h"

static int cuda_fail(cudaError_t e, const char *what, char *err, size_t errlen) {
    if (err && errlen) snprintf(err, errlen, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
    return -1;
}

extern "C" int lt_cuda_device_count(char *err, size_t errlen) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice) {
        cuda_fail(e, "no GPU", err, errlen);
        cudaGetLastError(); /* clear the sticky error so a later query starts clean */
        return 0;
    }
    if (e != cudaSuccess) {
        cuda_fail(e, "cudaGetDeviceCount", err, errlen);
        return 0;
    }
    return n;
}

extern "C" int lt_cuda_device_describe(int d, char *out, size_t outlen) {
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, d);
    if (e != cudaSuccess) return cuda_fail(e, "cudaGetDeviceProperties", out, outlen);
    snprintf(out, outlen, "%s, sm_%d%d, %.1f GiB", p.name, p.major, p.minor, (double)p.totalGlobalMem / (1 << 30));
    return 0;
}

__global__ void adamw_kernel(float *param, const float *grad, float *m, float *v, int64_t n, float lr, float beta1,
                             float beta2, float eps, float wd, float bc1, float bc2) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grad[i];
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float p = param[i] * (1.0f - lr * wd);
    param[i] = p - lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
}

extern "C" int lt_cuda_adamw_update(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, int64_t n,
                                    float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step,
                                    char *err, size_t errlen) {
    if (n <= 0) return 0;
    float bc1 = 1.0f - powf(beta1, (float)step), bc2 = 1.0f - powf(beta2, (float)step);
    int threads = 256;
    int64_t blocks = (n + threads - 1) / threads;
    adamw_kernel<<<(unsigned)blocks, threads>>>(param, grad, exp_avg, exp_avg_sq, n, lr, beta1, beta2, eps,
                                               weight_decay, bc1, bc2);
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    return e == cudaSuccess ? 0 : cuda_fail(e, "adamw kernel", err, errlen);
}

extern "C" void *lt_cuda_malloc(size_t nbytes, char *err, size_t errlen) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, nbytes);
    if (e != cudaSuccess) {
        cuda_fail(e, "cudaMalloc", err, errlen);
        return NULL;
    }
    return p;
}

extern "C" void lt_cuda_free(void *p) { cudaFree(p); }

extern "C" int lt_cuda_copy(void *dst, const void *src, size_t nbytes, int to_device, char *err, size_t errlen) {
    cudaError_t e = cudaMemcpy(dst, src, nbytes, to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? 0 : cuda_fail(e, "cudaMemcpy", err, errlen);
}
