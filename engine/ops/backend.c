/* The built-in CPU backend (memory, optimizer kernels; its op tables are in cpu_tables.c) and the
 * loader of the CUDA plugin. */
#define _GNU_SOURCE
#include "engine/ops/backend.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/core/alloc.h"
#include "engine/core/error.h"
#include "engine/core/rng.h"
#include "engine/ops/ops.h"

static void cpu_memzero(void *p, size_t n) { memset(p, 0, n); }
static void cpu_copy(void *dst, const void *src, size_t n) { memmove(dst, src, n); }
static int cpu_synchronize(char *err, size_t errlen) {
    (void)err, (void)errlen;
    return 0;
}
static void cpu_memory_stats(size_t *in_use, size_t *peak, size_t *cached) {
    lt_alloc_stats s = lt_alloc_get_stats();
    if (in_use) *in_use = s.in_use;
    if (peak) *peak = s.peak_in_use;
    if (cached) *cached = s.cached;
}
static void cpu_fill(float *out, int64_t n, float value) {
    for (int64_t i = 0; i < n; i++) out[i] = value;
}

static void cpu_cast_to_bf16(void *dst, const float *src, int64_t n) {
    uint16_t *h = dst;
    for (int64_t i = 0; i < n; i++) h[i] = lt_f32_to_bf16(src[i]);
}

/* cpu_tables.c: ops.h at fp32, and the bf16 reference. */
extern const lt_ops lt_cpu_ops_f32, lt_cpu_ops_bf16;

static const lt_backend cpu = {
    .abi = LT_BACKEND_ABI,
    .name = "cpu",
    .device = LT_CPU,
    .description = "CPU (OpenBLAS, OpenMP)",
    .alloc = lt_alloc,
    .release = lt_release,
    .memzero = cpu_memzero,
    .to_device = cpu_copy,
    .to_host = cpu_copy,
    .copy = cpu_copy,
    .synchronize = cpu_synchronize,
    .memory_stats = cpu_memory_stats,
    .reset_peak = lt_alloc_reset_peak,
    .fill = cpu_fill,
    .fill_normal = lt_rng_fill_normal,
    .sum_squares = lt_sum_squares,
    .scale = lt_scale,
    .cast_to_bf16 = cpu_cast_to_bf16,
    .adamw_update = lt_adamw_update,
    .sgd_update = lt_sgd_update,
    .f32 = &lt_cpu_ops_f32,
    .bf16 = &lt_cpu_ops_bf16,
};

const lt_backend *lt_backend_cpu(void) { return &cpu; }

/* dlopen of dir/luatron_cuda.so; NULL (err set) when the file is absent or does not load. */
static void *open_plugin_in(const char *dir, char *err, size_t errlen) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, LT_CUDA_PLUGIN_FILE);
    if (access(path, R_OK) != 0) return NULL;
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) lt_fail(err, errlen, "cannot load the CUDA backend %s: %s", path, dlerror());
    return h;
}

static void dir_of(char *path) {
    char *slash = strrchr(path, '/');
    if (slash) *slash = '\0';
    else strcpy(path, ".");
}

static void *open_plugin(char *err, size_t errlen) {
    const char *env = getenv("LUATRON_CUDA_PLUGIN");
    if (env && *env) {
        void *h = dlopen(env, RTLD_NOW | RTLD_LOCAL);
        if (!h) lt_fail(err, errlen, "cannot load the CUDA backend LUATRON_CUDA_PLUGIN=%s: %s", env, dlerror());
        return h;
    }
    char dir[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", dir, sizeof dir - 1);
    if (n > 0) {
        dir[n] = '\0';
        dir_of(dir);
        void *h = open_plugin_in(dir, err, errlen);
        if (h || err[0]) return h;
    }
    Dl_info info;
    if (dladdr((void *)lt_backend_cpu, &info) && info.dli_fname) {
        snprintf(dir, sizeof dir, "%s", info.dli_fname);
        dir_of(dir);
        void *h = open_plugin_in(dir, err, errlen);
        if (h || err[0]) return h;
    }
    lt_fail(err, errlen,
            "the CUDA backend (%s) is not beside the luatron executable: build it with `bazel build //:luatron_cuda.so` "
            "or point LUATRON_CUDA_PLUGIN at it",
            LT_CUDA_PLUGIN_FILE);
    return NULL;
}

const lt_backend *lt_backend_get(const char *device, char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    if (!device || strcmp(device, "cpu") == 0) return &cpu;
    if (strcmp(device, "cuda") != 0) {
        lt_fail(err, errlen, "unknown device '%s': use \"cpu\" or \"cuda\"", device);
        return NULL;
    }
    /* Loaded once per process; a failure is reported again on every call. */
    static const lt_backend *cuda;
    static char cuda_err[512];
    static int tried;
    if (!tried) {
        tried = 1;
        void *h = open_plugin(cuda_err, sizeof cuda_err);
        if (h) {
            lt_backend_open_fn open = (lt_backend_open_fn)dlsym(h, LT_CUDA_PLUGIN_SYMBOL);
            if (!open) lt_fail(cuda_err, sizeof cuda_err, "%s lacks %s", LT_CUDA_PLUGIN_FILE, LT_CUDA_PLUGIN_SYMBOL);
            else cuda = open(cuda_err, sizeof cuda_err);
            if (cuda && cuda->abi != LT_BACKEND_ABI) {
                lt_fail(cuda_err, sizeof cuda_err,
                        "%s was built for another version of luatron (backend ABI %d, this luatron has %d): rebuild it "
                        "with `bazel build //:luatron_cuda.so`",
                        LT_CUDA_PLUGIN_FILE, cuda->abi, LT_BACKEND_ABI);
                cuda = NULL;
            }
        }
    }
    if (!cuda) lt_fail(err, errlen, "device \"cuda\" is not available: %s", cuda_err);
    return cuda;
}

const lt_backend *lt_backend_of(const lt_tensor *t) {
    return t->storage->device == LT_CUDA ? lt_backend_get("cuda", NULL, 0) : &cpu;
}

lt_tensor *lt_backend_to_host(const lt_tensor *t) {
    if (t->storage->device == LT_CPU) return lt_tensor_clone(t);
    if (!lt_tensor_is_contiguous(t)) return NULL;
    lt_tensor *h = lt_tensor_new(t->dtype, t->ndim, t->shape);
    if (h) lt_backend_of(t)->to_host(lt_tensor_data(h), lt_tensor_data(t),
                                     (size_t)lt_tensor_numel(t) * lt_dtype_size(t->dtype));
    return h;
}

lt_tensor *lt_backend_tensor(const lt_backend *be, lt_dtype dtype, int ndim, const int64_t *shape) {
    size_t nbytes = lt_dtype_size(dtype);
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return NULL;
        nbytes *= (size_t)shape[d];
    }
    if (nbytes == 0) nbytes = lt_dtype_size(dtype);
    void *data = be->alloc(nbytes);
    if (!data) return NULL;
    be->memzero(data, nbytes);
    lt_tensor *t = lt_tensor_wrap(dtype, ndim, shape, data, nbytes, be->device, be->release);
    if (!t) be->release(data, nbytes);
    return t;
}
