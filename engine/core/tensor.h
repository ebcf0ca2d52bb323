/* Tensors: a typed, strided view over reference-counted storage.
 * Views share storage (slices, reshapes, a model's parameters inside its flat buffer);
 * the storage goes back to the caching allocator when its last view is freed. */
#ifndef LT_TENSOR_H
#define LT_TENSOR_H
#include <stddef.h>
#include <stdint.h>

#define LT_MAX_DIMS 8

typedef enum { LT_F32 = 0, LT_BF16 = 1, LT_I32 = 2, LT_I64 = 3 } lt_dtype;
typedef enum { LT_CPU = 0, LT_CUDA = 1 } lt_device;

typedef struct lt_storage {
    void *data;
    size_t nbytes;
    int refs;
    lt_device device;
    int owns; /* 0 for storage that wraps memory owned elsewhere (an mmap, a borrowed buffer) */
    void (*release)(void *data, size_t nbytes); /* how owned memory goes back; NULL: lt_release (host) */
} lt_storage;

typedef struct lt_tensor {
    lt_dtype dtype;
    int ndim;
    int64_t shape[LT_MAX_DIMS];
    int64_t stride[LT_MAX_DIMS]; /* in elements */
    int64_t offset;              /* in elements, into storage */
    lt_storage *storage;
} lt_tensor;

size_t lt_dtype_size(lt_dtype dtype);
const char *lt_dtype_name(lt_dtype dtype);
/* Parses "f32"/"float32", "bf16", "i32"/"int32", "i64"/"int64"; returns -1 when unknown. */
int lt_dtype_parse(const char *name);

/* A new contiguous zero-filled tensor; NULL when out of memory or the shape is invalid. */
lt_tensor *lt_tensor_new(lt_dtype dtype, int ndim, const int64_t *shape);
/* A contiguous tensor over memory allocated elsewhere (e.g. on a GPU): `release` gives it back when
 * the last view is freed (NULL: never). NULL when the shape is invalid or needs more than nbytes. */
lt_tensor *lt_tensor_wrap(lt_dtype dtype, int ndim, const int64_t *shape, void *data, size_t nbytes,
                          lt_device device, void (*release)(void *data, size_t nbytes));
/* A view of `base`'s storage with its own shape, strides (elements) and offset. */
lt_tensor *lt_tensor_view(const lt_tensor *base, int ndim, const int64_t *shape, const int64_t *stride,
                          int64_t offset);
/* A contiguous view of a contiguous tensor with a new shape of the same element count; NULL otherwise. */
lt_tensor *lt_tensor_reshape(const lt_tensor *t, int ndim, const int64_t *shape);
/* Elements [start, start+length) along dim. */
lt_tensor *lt_tensor_narrow(const lt_tensor *t, int dim, int64_t start, int64_t length);
/* A contiguous copy. */
lt_tensor *lt_tensor_clone(const lt_tensor *t);
/* dst[i] = src[i] in row-major order: dst contiguous, src any strides, one dtype, both in host memory
 * (a transposed view is copied in tiles, so both sides stay in cache). */
void lt_tensor_gather(lt_tensor *dst, const lt_tensor *src);
void lt_tensor_free(lt_tensor *t);

int64_t lt_tensor_numel(const lt_tensor *t);
int lt_tensor_is_contiguous(const lt_tensor *t);
/* Address of the first element. */
void *lt_tensor_data(const lt_tensor *t);
/* Element at a flat row-major position (any strides), converted to double; and the reverse. */
double lt_tensor_get_flat(const lt_tensor *t, int64_t i);
void lt_tensor_set_flat(lt_tensor *t, int64_t i, double v);
/* Contiguous row-major strides for a shape. */
void lt_contiguous_strides(int ndim, const int64_t *shape, int64_t *stride);

/* bf16 storage format: the top half of an fp32, rounded to nearest even. */
uint16_t lt_f32_to_bf16(float f);
float lt_bf16_to_f32(uint16_t h);

#endif
