#include "engine/core/tensor.h"

#include <stdlib.h>
#include <string.h>

#include "engine/core/alloc.h"

size_t lt_dtype_size(lt_dtype dtype) {
    switch (dtype) {
    case LT_F32: return 4;
    case LT_BF16: return 2;
    case LT_I32: return 4;
    case LT_I64: return 8;
    }
    return 0;
}

const char *lt_dtype_name(lt_dtype dtype) {
    switch (dtype) {
    case LT_F32: return "float32";
    case LT_BF16: return "bfloat16";
    case LT_I32: return "int32";
    case LT_I64: return "int64";
    }
    return "?";
}

int lt_dtype_parse(const char *name) {
    static const struct { const char *name; lt_dtype dtype; } names[] = {
        {"f32", LT_F32}, {"float32", LT_F32}, {"float", LT_F32}, {"bf16", LT_BF16}, {"bfloat16", LT_BF16},
        {"i32", LT_I32}, {"int32", LT_I32},   {"int", LT_I32},   {"i64", LT_I64},   {"int64", LT_I64},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(name, names[i].name) == 0) return (int)names[i].dtype;
    return -1;
}

void lt_contiguous_strides(int ndim, const int64_t *shape, int64_t *stride) {
    int64_t s = 1;
    for (int d = ndim - 1; d >= 0; d--) {
        stride[d] = s;
        s *= shape[d];
    }
}

static lt_tensor *tensor_header(lt_dtype dtype, int ndim, const int64_t *shape) {
    if (ndim < 0 || ndim > LT_MAX_DIMS) return NULL;
    for (int d = 0; d < ndim; d++)
        if (shape[d] < 0) return NULL;
    lt_tensor *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->dtype = dtype;
    t->ndim = ndim;
    memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
    return t;
}

lt_tensor *lt_tensor_new(lt_dtype dtype, int ndim, const int64_t *shape) {
    lt_tensor *t = tensor_header(dtype, ndim, shape);
    if (!t) return NULL;
    lt_contiguous_strides(ndim, shape, t->stride);
    size_t nbytes = (size_t)lt_tensor_numel(t) * lt_dtype_size(dtype);
    lt_storage *s = calloc(1, sizeof *s);
    void *data = lt_alloc(nbytes);
    if (!s || !data) {
        free(s);
        lt_release(data, nbytes);
        free(t);
        return NULL;
    }
    memset(data, 0, nbytes);
    *s = (lt_storage){.data = data, .nbytes = nbytes, .refs = 1, .device = LT_CPU, .owns = 1};
    t->storage = s;
    return t;
}

lt_tensor *lt_tensor_wrap(lt_dtype dtype, int ndim, const int64_t *shape, void *data, size_t nbytes,
                          lt_device device, void (*release)(void *data, size_t nbytes)) {
    lt_tensor *t = tensor_header(dtype, ndim, shape);
    if (!t) return NULL;
    lt_contiguous_strides(ndim, shape, t->stride);
    lt_storage *s = calloc(1, sizeof *s);
    if (!s || (size_t)lt_tensor_numel(t) * lt_dtype_size(dtype) > nbytes) {
        free(s);
        free(t);
        return NULL;
    }
    *s = (lt_storage){.data = data, .nbytes = nbytes, .refs = 1, .device = device, .owns = release != NULL,
                      .release = release};
    t->storage = s;
    return t;
}

lt_tensor *lt_tensor_view(const lt_tensor *base, int ndim, const int64_t *shape, const int64_t *stride,
                          int64_t offset) {
    lt_tensor *t = tensor_header(base->dtype, ndim, shape);
    if (!t) return NULL;
    memcpy(t->stride, stride, sizeof(int64_t) * (size_t)ndim);
    t->offset = offset;
    /* Bounds: the furthest element reachable must lie inside the storage. */
    int64_t last = offset;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] == 0) { last = offset; break; }
        if (stride[d] < 0) { free(t); return NULL; }
        last += (shape[d] - 1) * stride[d];
    }
    if (offset < 0 || (size_t)(last + 1) * lt_dtype_size(base->dtype) > base->storage->nbytes) {
        if (!(lt_tensor_numel(t) == 0 && offset >= 0)) {
            free(t);
            return NULL;
        }
    }
    t->storage = base->storage;
    t->storage->refs++;
    return t;
}

lt_tensor *lt_tensor_reshape(const lt_tensor *t, int ndim, const int64_t *shape) {
    if (!lt_tensor_is_contiguous(t) || ndim > LT_MAX_DIMS) return NULL;
    int64_t n = 1, stride[LT_MAX_DIMS];
    for (int d = 0; d < ndim; d++) n *= shape[d];
    if (n != lt_tensor_numel(t)) return NULL;
    lt_contiguous_strides(ndim, shape, stride);
    return lt_tensor_view(t, ndim, shape, stride, t->offset);
}

lt_tensor *lt_tensor_narrow(const lt_tensor *t, int dim, int64_t start, int64_t length) {
    if (dim < 0 || dim >= t->ndim || start < 0 || length < 0 || start + length > t->shape[dim]) return NULL;
    int64_t shape[LT_MAX_DIMS];
    memcpy(shape, t->shape, sizeof shape);
    shape[dim] = length;
    return lt_tensor_view(t, t->ndim, shape, t->stride, t->offset + start * t->stride[dim]);
}

#define LT_GATHER_TILE 32

/* Rows [0, R) x columns [0, C) of a 2-D source with strides (sr, sc) into a contiguous [R, C], element
 * size es, tile by tile. */
#define GATHER_2D(T)                                                                                       \
    for (int64_t r0 = 0; r0 < R; r0 += LT_GATHER_TILE)                                                     \
        for (int64_t c0 = 0; c0 < C; c0 += LT_GATHER_TILE) {                                               \
            const int64_t r1 = r0 + LT_GATHER_TILE < R ? r0 + LT_GATHER_TILE : R;                          \
            const int64_t c1 = c0 + LT_GATHER_TILE < C ? c0 + LT_GATHER_TILE : C;                          \
            for (int64_t r = r0; r < r1; r++)                                                              \
                for (int64_t c = c0; c < c1; c++) ((T *)d)[r * C + c] = ((const T *)s)[r * sr + c * sc];   \
        }
static void gather_2d(char *d, const char *s, int64_t R, int64_t C, int64_t sr, int64_t sc, size_t es) {
    if (es == 4) {
        GATHER_2D(uint32_t)
    } else if (es == 2) {
        GATHER_2D(uint16_t)
    } else {
        GATHER_2D(uint64_t)
    }
}
#undef GATHER_2D

void lt_tensor_gather(lt_tensor *dst, const lt_tensor *src) {
    const size_t es = lt_dtype_size(src->dtype);
    const int nd = src->ndim;
    char *d = lt_tensor_data(dst);
    const char *s = lt_tensor_data(src);
    if (lt_tensor_is_contiguous(src)) {
        memcpy(d, s, (size_t)lt_tensor_numel(src) * es);
        return;
    }
    if (nd < 2) { /* one strided row */
        for (int64_t i = 0; i < lt_tensor_numel(src); i++) memcpy(d + (size_t)i * es, s + (size_t)(i * src->stride[0]) * es, es);
        return;
    }
    /* an odometer over all but the last two dimensions, a tiled 2-D gather for those */
    const int64_t R = src->shape[nd - 2], C = src->shape[nd - 1], plane = R * C;
    int64_t idx[LT_MAX_DIMS] = {0}, planes = plane ? lt_tensor_numel(src) / plane : 0;
    for (int64_t p = 0; p < planes; p++) {
        int64_t off = 0;
        for (int k = 0; k < nd - 2; k++) off += idx[k] * src->stride[k];
        gather_2d(d + (size_t)(p * plane) * es, s + (size_t)off * es, R, C, src->stride[nd - 2], src->stride[nd - 1], es);
        for (int k = nd - 3; k >= 0 && ++idx[k] == src->shape[k]; k--) idx[k] = 0;
    }
}

lt_tensor *lt_tensor_clone(const lt_tensor *t) {
    lt_tensor *c = lt_tensor_new(t->dtype, t->ndim, t->shape);
    if (c) lt_tensor_gather(c, t);
    return c;
}

void lt_tensor_free(lt_tensor *t) {
    if (!t) return;
    lt_storage *s = t->storage;
    if (s && --s->refs == 0) {
        if (s->owns) (s->release ? s->release : lt_release)(s->data, s->nbytes);
        free(s);
    }
    free(t);
}

int64_t lt_tensor_numel(const lt_tensor *t) {
    int64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
    return n;
}

int lt_tensor_is_contiguous(const lt_tensor *t) {
    int64_t s = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->shape[d] != 1 && t->stride[d] != s) return 0;
        s *= t->shape[d];
    }
    return 1;
}

void *lt_tensor_data(const lt_tensor *t) {
    return (char *)t->storage->data + (size_t)t->offset * lt_dtype_size(t->dtype);
}

static int64_t flat_to_offset(const lt_tensor *t, int64_t i) {
    int64_t off = 0;
    for (int d = t->ndim - 1; d >= 0; d--) {
        off += (i % t->shape[d]) * t->stride[d];
        i /= t->shape[d];
    }
    return off;
}

double lt_tensor_get_flat(const lt_tensor *t, int64_t i) {
    void *p = lt_tensor_data(t);
    int64_t o = flat_to_offset(t, i);
    switch (t->dtype) {
    case LT_F32: return ((float *)p)[o];
    case LT_BF16: return lt_bf16_to_f32(((uint16_t *)p)[o]);
    case LT_I32: return ((int32_t *)p)[o];
    case LT_I64: return (double)((int64_t *)p)[o];
    }
    return 0;
}

void lt_tensor_set_flat(lt_tensor *t, int64_t i, double v) {
    void *p = lt_tensor_data(t);
    int64_t o = flat_to_offset(t, i);
    switch (t->dtype) {
    case LT_F32: ((float *)p)[o] = (float)v; break;
    case LT_BF16: ((uint16_t *)p)[o] = lt_f32_to_bf16((float)v); break;
    case LT_I32: ((int32_t *)p)[o] = (int32_t)v; break;
    case LT_I64: ((int64_t *)p)[o] = (int64_t)v; break;
    }
}

uint16_t lt_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float lt_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
