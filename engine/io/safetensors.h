/* Checkpoints in the safetensors format (https://github.com/huggingface/safetensors).
 *
 * Layout: u64 little-endian header size N, N bytes of UTF-8 JSON (padded with spaces so
 * the data starts 8-byte aligned), then the data section. The JSON maps tensor names to
 * {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data section)
 * plus an optional "__metadata__" object of string -> string.
 *
 * Integrity: the writer adds metadata "luatron.checksum": 16 lowercase hex digits of a
 * 64-bit FNV-1a over the whole file (size prefix, header and data section) in which the
 * 16 digits themselves are read as '0'. Covering the header as well as the data means any
 * single changed byte anywhere is detected, not only damage that breaks the structure.
 * Files from other writers have no checksum and are still read (strictly validated).
 *
 * Errors never abort: functions return NULL / -1 and write a message that names the file
 * and the problem into err[errlen] (err may be NULL). */
#ifndef LT_SAFETENSORS_H
#define LT_SAFETENSORS_H
#include <stddef.h>
#include <stdint.h>

typedef enum {
    LT_ST_BOOL,
    LT_ST_U8,
    LT_ST_I8,
    LT_ST_F8_E5M2,
    LT_ST_F8_E4M3,
    LT_ST_F8_E8M0,
    LT_ST_I16,
    LT_ST_U16,
    LT_ST_F16,
    LT_ST_BF16,
    LT_ST_I32,
    LT_ST_U32,
    LT_ST_F32,
    LT_ST_F64,
    LT_ST_I64,
    LT_ST_U64,
    LT_ST_C64,
    LT_ST_NDTYPES
} lt_st_dtype;

/* Most dimensions a tensor may have (real checkpoints use <= 5). */
#define LT_ST_MAX_DIMS 8
/* Largest accepted header, as in the reference implementation: bounds parsing work. */
#define LT_ST_MAX_HEADER (100u << 20)
/* Metadata key the writer fills in; reserved (callers cannot set it). */
#define LT_ST_CHECKSUM_KEY "luatron.checksum"

/* Name as written in files ("F32", "BF16", ...), or NULL for an invalid value. */
const char *lt_st_dtype_name(lt_st_dtype dt);
/* Bytes per element, 0 for an invalid value. */
size_t lt_st_dtype_size(lt_st_dtype dt);
/* Looks up a file dtype name; returns 0 and sets *out, or -1 if unknown. */
int lt_st_dtype_parse(const char *name, lt_st_dtype *out);

/* 64-bit FNV-1a, continued from h (start with LT_ST_FNV_INIT). */
#define LT_ST_FNV_INIT 0xcbf29ce484222325ull
uint64_t lt_st_fnv1a(uint64_t h, const void *data, size_t n);

/* ---------------------------------------------------------------- writer */

typedef struct lt_st_writer lt_st_writer;

/* NULL only when out of memory. */
lt_st_writer *lt_st_writer_new(void);
void lt_st_writer_free(lt_st_writer *w);

/* Registers a tensor. The name and shape are copied; `data` (product(shape) * dtype size
 * bytes, row-major, little-endian) is NOT copied: it is read during lt_st_writer_write,
 * so it must stay alive and unchanged until then. ndim = 0 is a scalar (one element);
 * a zero dimension gives an empty tensor (data may then be NULL).
 * Returns 0, or -1 with err (bad name, dtype, rank, negative dimension, size overflow). */
int lt_st_writer_add(lt_st_writer *w, const char *name, lt_st_dtype dtype, int ndim,
                     const int64_t *shape, const void *data, char *err, size_t errlen);

/* Adds a "__metadata__" string pair (both copied; valid UTF-8; key not reserved). */
int lt_st_writer_meta(lt_st_writer *w, const char *key, const char *value, char *err, size_t errlen);

/* Writes everything to `path`: first to "<path>.tmp.<pid>", then fflush + fsync, then
 * rename over `path` (and fsync of the directory), so a crash leaves either the old file
 * or the complete new one under `path`, never a partial one. Tensors are laid out in
 * sorted-name order (strcmp) with no gaps; metadata keys are sorted too, so the same
 * inputs always give the same bytes. Duplicate names or keys are errors. The writer can
 * be written again or freed afterwards. Returns 0, or -1 with err (tmp file removed). */
int lt_st_writer_write(lt_st_writer *w, const char *path, char *err, size_t errlen);

/* ---------------------------------------------------------------- reader */

typedef struct lt_st_file lt_st_file;

typedef struct {
    const char *name;
    lt_st_dtype dtype;
    int ndim;
    int64_t shape[LT_ST_MAX_DIMS];
    uint64_t numel;
    /* Read-only bytes inside the mapped file, valid until lt_st_close. Alignment follows
     * from the layout: files with only 4-byte dtypes (or laid out largest-first, as the
     * reference writer does) are aligned; otherwise memcpy rather than cast. */
    const void *data;
    size_t nbytes;
    uint64_t offset; /* begin of data_offsets, relative to the data section */
} lt_st_tensor;

/* Open flags. Default (0): verify the checksum when the file has one. */
enum {
    LT_ST_NO_VERIFY = 1,        /* skip the checksum pass (it reads every byte of the file) */
    LT_ST_REQUIRE_CHECKSUM = 2, /* reject files without luatron.checksum (our own checkpoints) */
};

/* Maps and validates the whole file. Returns NULL with err on any problem.
 * The mapping is only safe while nobody truncates the file in place (that would raise
 * SIGBUS on access); lt_st_writer_write replaces files by rename, which leaves open
 * mappings of the old file intact. */
lt_st_file *lt_st_open(const char *path, char *err, size_t errlen);
lt_st_file *lt_st_open_ex(const char *path, unsigned flags, char *err, size_t errlen);
void lt_st_close(lt_st_file *f);

/* Tensors, sorted by name: i in [0, lt_st_count). */
size_t lt_st_count(const lt_st_file *f);
const lt_st_tensor *lt_st_tensor_at(const lt_st_file *f, size_t i);
const char *lt_st_name(const lt_st_file *f, size_t i);
/* Tensor by exact name (binary search), or NULL. */
const lt_st_tensor *lt_st_find(const lt_st_file *f, const char *name);

/* Metadata pairs, sorted by key (includes luatron.checksum when present). */
size_t lt_st_meta_count(const lt_st_file *f);
int lt_st_meta_at(const lt_st_file *f, size_t i, const char **key, const char **value);
/* Value for key, or NULL. */
const char *lt_st_meta(const lt_st_file *f, const char *key);

/* 1 when the file carried a checksum and it was verified on open. */
int lt_st_verified(const lt_st_file *f);

#endif
