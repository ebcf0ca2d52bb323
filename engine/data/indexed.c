#define _POSIX_C_SOURCE 200809L
#include "engine/core/error.h"
#include "engine/data/indexed.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the MMIDIDX format is little endian; this reader maps it as-is"
#endif

#define HEADER_BYTES 34 /* magic 9 + version 8 + dtype 1 + counts 16 */
static const char MAGIC[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};

int lt_indexed_dtype_size(int dtype) {
    switch (dtype) {
    case LT_DTYPE_UINT8: case LT_DTYPE_INT8: return 1;
    case LT_DTYPE_INT16: case LT_DTYPE_UINT16: return 2;
    case LT_DTYPE_INT32: case LT_DTYPE_FLOAT32: return 4;
    case LT_DTYPE_INT64: case LT_DTYPE_FLOAT64: return 8;
    default: return 0;
    }
}

const char *lt_indexed_dtype_name(int dtype) {
    static const char *names[] = {"unknown", "uint8", "int8",    "int16",  "int32",
                                  "int64",   "float64", "float32", "uint16"};
    return (dtype >= 1 && dtype <= 8) ? names[dtype] : names[0];
}

int lt_indexed_optimal_dtype(int64_t vocab_size) {
    return (vocab_size > 0 && vocab_size < 65500) ? LT_DTYPE_UINT16 : LT_DTYPE_INT32;
}

/* Unaligned little-endian loads: the .idx arrays start at byte 34, so they are never aligned. */
static inline int32_t ld_i32(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }
static inline int64_t ld_i64(const uint8_t *p) { int64_t v; memcpy(&v, p, 8); return v; }
static inline uint64_t ld_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

struct lt_indexed {
    char *prefix, *idx_path, *bin_path;
    const uint8_t *idx, *bin;
    size_t idx_size, bin_size;
    int dtype, itemsize, multimodal;
    int64_t nseq, ndocidx, ntokens;
    const uint8_t *lens, *ptrs, *docs; /* into idx */
};

static char *cat(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    char *s = malloc(la + lb + 1);
    if (s) { memcpy(s, a, la); memcpy(s + la, b, lb + 1); }
    return s;
}

/* Maps a whole file read-only; an empty file gives data NULL and size 0. */
static int map_file(const char *path, const uint8_t **data, size_t *size, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return lt_fail(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return lt_fail(err, errlen, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return lt_fail(err, errlen, "%s: not a regular file", path);
    }
    *size = (size_t)st.st_size;
    *data = NULL;
    if (*size > 0) {
        void *m = mmap(NULL, *size, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            close(fd);
            return lt_fail(err, errlen, "%s: cannot mmap %zu bytes: %s", path, *size, strerror(e));
        }
        *data = m;
    }
    close(fd); /* the mapping keeps the file alive */
    return 0;
}

void lt_indexed_close(lt_indexed *ds) {
    if (!ds) return;
    if (ds->idx) munmap((void *)ds->idx, ds->idx_size);
    if (ds->bin) munmap((void *)ds->bin, ds->bin_size);
    free(ds->prefix);
    free(ds->idx_path);
    free(ds->bin_path);
    free(ds);
}

static int validate(lt_indexed *ds, char *err, size_t errlen) {
    const char *ip = ds->idx_path, *bp = ds->bin_path;
    const uint8_t *h = ds->idx;
    size_t size = ds->idx_size;
    if (size < HEADER_BYTES)
        return lt_fail(err, errlen, "%s: truncated: %zu bytes, the header alone needs %d", ip, size,
                    HEADER_BYTES);
    if (memcmp(h, MAGIC, 9) != 0)
        return lt_fail(err, errlen, "%s: bad magic: not a Megatron indexed dataset (expected \"MMIDIDX\\0\\0\")", ip);
    uint64_t version = ld_u64(h + 9);
    if (version != 1)
        return lt_fail(err, errlen, "%s: unsupported version %llu (expected 1)", ip,
                    (unsigned long long)version);
    ds->dtype = h[17];
    ds->itemsize = lt_indexed_dtype_size(ds->dtype);
    if (!ds->itemsize)
        return lt_fail(err, errlen, "%s: unknown dtype code %d (expected 1..8)", ip, ds->dtype);
    uint64_t S = ld_u64(h + 18), D = ld_u64(h + 26);
    if (D == 0)
        return lt_fail(err, errlen, "%s: document index is empty (it needs at least its leading 0)", ip);
    /* Compare counts with the room the file has, never multiply untrusted counts first. */
    uint64_t avail = size - HEADER_BYTES;
    if (D > avail / 8)
        return lt_fail(err, errlen,
                    "%s: truncated: header says %llu document-index entries but file has room for %llu",
                    ip, (unsigned long long)D, (unsigned long long)(avail / 8));
    avail -= D * 8;
    if (S > avail / 12)
        return lt_fail(err, errlen, "%s: truncated: header says %llu sequences but file has room for %llu",
                    ip, (unsigned long long)S, (unsigned long long)(avail / 12));
    uint64_t rest = avail - S * 12;
    if (rest == S && S > 0) {
        ds->multimodal = 1;
    } else if (rest != 0) {
        return lt_fail(err, errlen,
                    "%s: %llu unexpected bytes after the document index (expected 0, or %llu sequence modes)",
                    ip, (unsigned long long)rest, (unsigned long long)S);
    }
    ds->nseq = (int64_t)S;
    ds->ndocidx = (int64_t)D;
    ds->lens = h + HEADER_BYTES;
    ds->ptrs = ds->lens + 4 * S;
    ds->docs = ds->ptrs + 8 * S;

    uint64_t bsize = ds->bin_size, isz = (uint64_t)ds->itemsize;
    int64_t total = 0;
    for (int64_t i = 0; i < ds->nseq; i++) {
        int32_t len = ld_i32(ds->lens + 4 * i);
        int64_t ptr = ld_i64(ds->ptrs + 8 * i);
        if (len < 0) return lt_fail(err, errlen, "%s: sequence %lld has negative length %d", ip, (long long)i, len);
        if (ptr < 0)
            return lt_fail(err, errlen, "%s: sequence %lld has negative byte offset %lld", ip, (long long)i,
                        (long long)ptr);
        uint64_t end = (uint64_t)ptr + (uint64_t)len * isz; /* < 2^63 + 2^34: no overflow */
        if (end > bsize)
            return lt_fail(err, errlen,
                        "%s: sequence %lld (%d tokens of %s at byte %lld) ends at byte %llu, past the end of %s (%llu bytes)",
                        ip, (long long)i, len, lt_indexed_dtype_name(ds->dtype), (long long)ptr,
                        (unsigned long long)end, bp, (unsigned long long)bsize);
        total += len;
    }
    ds->ntokens = total;
    int64_t prev = ld_i64(ds->docs);
    if (prev != 0)
        return lt_fail(err, errlen, "%s: document index starts at %lld, expected 0", ip, (long long)prev);
    for (int64_t d = 1; d < ds->ndocidx; d++) {
        int64_t v = ld_i64(ds->docs + 8 * d);
        if (v < prev)
            return lt_fail(err, errlen, "%s: document index decreases at entry %lld (%lld after %lld)", ip,
                        (long long)d, (long long)v, (long long)prev);
        prev = v;
    }
    if (prev != ds->nseq)
        return lt_fail(err, errlen, "%s: document index ends at sequence %lld but there are %lld sequences",
                    ip, (long long)prev, (long long)ds->nseq);
    return 0;
}

lt_indexed *lt_indexed_open(const char *prefix, char *err, size_t errlen) {
    if (!prefix || !*prefix) {
        lt_fail(err, errlen, "indexed dataset: empty path prefix");
        return NULL;
    }
    lt_indexed *ds = calloc(1, sizeof *ds);
    if (!ds || !(ds->prefix = cat(prefix, "")) || !(ds->idx_path = cat(prefix, ".idx")) ||
        !(ds->bin_path = cat(prefix, ".bin"))) {
        lt_fail(err, errlen, "%s: out of memory", prefix);
        lt_indexed_close(ds);
        return NULL;
    }
    if (map_file(ds->idx_path, &ds->idx, &ds->idx_size, err, errlen) != 0 ||
        map_file(ds->bin_path, &ds->bin, &ds->bin_size, err, errlen) != 0 ||
        validate(ds, err, errlen) != 0) {
        lt_indexed_close(ds);
        return NULL;
    }
    return ds;
}

const char *lt_indexed_prefix(const lt_indexed *ds) { return ds->prefix; }
int lt_indexed_dtype(const lt_indexed *ds) { return ds->dtype; }
int64_t lt_indexed_num_sequences(const lt_indexed *ds) { return ds->nseq; }
int64_t lt_indexed_num_documents(const lt_indexed *ds) { return ds->ndocidx - 1; }
int64_t lt_indexed_num_tokens(const lt_indexed *ds) { return ds->ntokens; }
int lt_indexed_multimodal(const lt_indexed *ds) { return ds->multimodal; }

int64_t lt_indexed_sequence_length(const lt_indexed *ds, int64_t i) {
    if (i < 0 || i >= ds->nseq) return -1;
    return ld_i32(ds->lens + 4 * i);
}

int64_t lt_indexed_document_start(const lt_indexed *ds, int64_t d) {
    if (d < 0 || d >= ds->ndocidx) return -1;
    return ld_i64(ds->docs + 8 * d);
}

int lt_indexed_read(const lt_indexed *ds, int64_t i, int64_t offset, int64_t count, int32_t *out,
                    char *err, size_t errlen) {
    if (i < 0 || i >= ds->nseq)
        return lt_fail(err, errlen, "%s: sequence %lld out of range (%lld sequences)", ds->prefix,
                    (long long)i, (long long)ds->nseq);
    int64_t len = ld_i32(ds->lens + 4 * i);
    if (offset < 0 || count < 0 || offset > len || count > len - offset)
        return lt_fail(err, errlen, "%s: tokens [%lld, %lld) out of range of sequence %lld (%lld tokens)",
                    ds->prefix, (long long)offset, (long long)offset + count, (long long)i,
                    (long long)len);
    const uint8_t *p = ds->bin + ld_i64(ds->ptrs + 8 * i) + offset * ds->itemsize;
    for (int64_t k = 0; k < count; k++, p += ds->itemsize) {
        int64_t v;
        switch (ds->dtype) {
        case LT_DTYPE_UINT8: v = p[0]; break;
        case LT_DTYPE_INT8: v = (int8_t)p[0]; break;
        case LT_DTYPE_INT16: { int16_t x; memcpy(&x, p, 2); v = x; break; }
        case LT_DTYPE_UINT16: { uint16_t x; memcpy(&x, p, 2); v = x; break; }
        case LT_DTYPE_INT32: { int32_t x; memcpy(&x, p, 4); v = x; break; }
        case LT_DTYPE_INT64: memcpy(&v, p, 8); break;
        default: {
            double x;
            if (ds->dtype == LT_DTYPE_FLOAT32) { float f; memcpy(&f, p, 4); x = f; }
            else memcpy(&x, p, 8);
            if (!(x >= 0.0 && x <= 2147483647.0) || x != floor(x))
                return lt_fail(err, errlen, "%s: sequence %lld token %lld is %g, not a token id", ds->prefix,
                            (long long)i, (long long)(offset + k), x);
            v = (int64_t)x;
        }
        }
        if (v < 0 || v > INT32_MAX)
            return lt_fail(err, errlen, "%s: sequence %lld token %lld has id %lld, outside [0, 2^31)",
                        ds->prefix, (long long)i, (long long)(offset + k), (long long)v);
        out[k] = (int32_t)v;
    }
    return 0;
}

/* ---------------- writer ---------------- */

struct lt_indexed_writer {
    char *bin_path, *idx_path, *bin_tmp, *idx_tmp;
    FILE *bin;
    int dtype, itemsize;
    int32_t *lens;
    int64_t nseq, lcap;
    int64_t *docs;
    int64_t ndocs, dcap; /* entries of the document index */
    int64_t ntokens;
    uint8_t *buf;
    size_t bufcap;
};

static void writer_free(lt_indexed_writer *w) {
    if (!w) return;
    if (w->bin) fclose(w->bin);
    free(w->bin_path); free(w->idx_path); free(w->bin_tmp); free(w->idx_tmp);
    free(w->lens); free(w->docs); free(w->buf);
    free(w);
}

void lt_indexed_writer_abort(lt_indexed_writer *w) {
    if (!w) return;
    if (w->bin) { fclose(w->bin); w->bin = NULL; }
    if (w->bin_tmp) unlink(w->bin_tmp);
    if (w->idx_tmp) unlink(w->idx_tmp);
    writer_free(w);
}

lt_indexed_writer *lt_indexed_writer_open(const char *prefix, int dtype, char *err, size_t errlen) {
    if (!prefix || !*prefix) {
        lt_fail(err, errlen, "indexed writer: empty output prefix");
        return NULL;
    }
    if (dtype == LT_DTYPE_FLOAT32 || dtype == LT_DTYPE_FLOAT64 || !lt_indexed_dtype_size(dtype)) {
        lt_fail(err, errlen, "%s: indexed writer needs an integer dtype, got code %d (%s)", prefix, dtype,
             lt_indexed_dtype_name(dtype));
        return NULL;
    }
    lt_indexed_writer *w = calloc(1, sizeof *w);
    char tail[64];
    snprintf(tail, sizeof tail, ".tmp.%ld", (long)getpid());
    if (!w || !(w->bin_path = cat(prefix, ".bin")) || !(w->idx_path = cat(prefix, ".idx")) ||
        !(w->bin_tmp = cat(w->bin_path, tail)) || !(w->idx_tmp = cat(w->idx_path, tail))) {
        lt_fail(err, errlen, "%s: out of memory", prefix);
        writer_free(w);
        return NULL;
    }
    w->dtype = dtype;
    w->itemsize = lt_indexed_dtype_size(dtype);
    w->dcap = 16;
    w->docs = malloc(sizeof(int64_t) * (size_t)w->dcap);
    if (!w->docs) {
        lt_fail(err, errlen, "%s: out of memory", prefix);
        writer_free(w);
        return NULL;
    }
    w->docs[w->ndocs++] = 0;
    w->bin = fopen(w->bin_tmp, "wb");
    if (!w->bin) {
        lt_fail(err, errlen, "%s: cannot create: %s", w->bin_tmp, strerror(errno));
        writer_free(w);
        return NULL;
    }
    return w;
}

static int64_t dtype_max(int dtype) {
    switch (dtype) {
    case LT_DTYPE_UINT8: return 255;
    case LT_DTYPE_INT8: return 127;
    case LT_DTYPE_INT16: return 32767;
    case LT_DTYPE_UINT16: return 65535;
    default: return INT32_MAX; /* int32 / int64 hold any int32 id */
    }
}

int lt_indexed_writer_add(lt_indexed_writer *w, const int32_t *tokens, int64_t n, char *err, size_t errlen) {
    if (n < 0 || n > INT32_MAX)
        return lt_fail(err, errlen, "%s: sequence length %lld does not fit the int32 length field", w->bin_path,
                    (long long)n);
    int64_t maxv = dtype_max(w->dtype);
    for (int64_t k = 0; k < n; k++)
        if (tokens[k] < 0 || tokens[k] > maxv)
            return lt_fail(err, errlen, "%s: token %lld of sequence %lld has id %d, outside [0, %lld] of dtype %s",
                        w->bin_path, (long long)k, (long long)w->nseq, tokens[k], (long long)maxv,
                        lt_indexed_dtype_name(w->dtype));
    if (w->nseq == w->lcap) {
        int64_t cap = w->lcap ? 2 * w->lcap : 1024;
        int32_t *p = realloc(w->lens, sizeof(int32_t) * (size_t)cap);
        if (!p) return lt_fail(err, errlen, "%s: out of memory", w->bin_path);
        w->lens = p;
        w->lcap = cap;
    }
    size_t need = (size_t)n * (size_t)w->itemsize;
    if (need > w->bufcap) {
        uint8_t *b = realloc(w->buf, need);
        if (!b) return lt_fail(err, errlen, "%s: out of memory", w->bin_path);
        w->buf = b;
        w->bufcap = need;
    }
    for (int64_t k = 0; k < n; k++) {
        uint8_t *p = w->buf + k * w->itemsize;
        switch (w->dtype) {
        case LT_DTYPE_UINT8: case LT_DTYPE_INT8: p[0] = (uint8_t)tokens[k]; break;
        case LT_DTYPE_INT16: case LT_DTYPE_UINT16: { uint16_t x = (uint16_t)tokens[k]; memcpy(p, &x, 2); break; }
        case LT_DTYPE_INT32: memcpy(p, &tokens[k], 4); break;
        default: { int64_t x = tokens[k]; memcpy(p, &x, 8); }
        }
    }
    if (need && fwrite(w->buf, 1, need, w->bin) != need)
        return lt_fail(err, errlen, "%s: write failed: %s", w->bin_tmp, strerror(errno));
    w->lens[w->nseq++] = (int32_t)n;
    w->ntokens += n;
    return 0;
}

int lt_indexed_writer_end_document(lt_indexed_writer *w, char *err, size_t errlen) {
    if (w->ndocs == w->dcap) {
        int64_t cap = 2 * w->dcap;
        int64_t *p = realloc(w->docs, sizeof(int64_t) * (size_t)cap);
        if (!p) return lt_fail(err, errlen, "%s: out of memory", w->idx_path);
        w->docs = p;
        w->dcap = cap;
    }
    w->docs[w->ndocs++] = w->nseq;
    return 0;
}

int64_t lt_indexed_writer_num_sequences(const lt_indexed_writer *w) { return w->nseq; }
int64_t lt_indexed_writer_num_documents(const lt_indexed_writer *w) { return w->ndocs - 1; }
int64_t lt_indexed_writer_num_tokens(const lt_indexed_writer *w) { return w->ntokens; }

/* Flushes and syncs so the rename publishes complete data. */
static int close_synced(FILE *f, const char *path, char *err, size_t errlen) {
    int bad = fflush(f) != 0 || fsync(fileno(f)) != 0;
    int e = errno;
    if (fclose(f) != 0 && !bad) { bad = 1; e = errno; }
    return bad ? lt_fail(err, errlen, "%s: write failed: %s", path, strerror(e)) : 0;
}

int lt_indexed_writer_finalize(lt_indexed_writer *w, char *err, size_t errlen) {
    if (w->docs[w->ndocs - 1] != w->nseq && lt_indexed_writer_end_document(w, err, errlen) != 0) goto bad;
    FILE *bin = w->bin;
    w->bin = NULL;
    if (close_synced(bin, w->bin_tmp, err, errlen) != 0) goto bad;
    FILE *f = fopen(w->idx_tmp, "wb");
    if (!f) { lt_fail(err, errlen, "%s: cannot create: %s", w->idx_tmp, strerror(errno)); goto bad; }
    uint8_t hdr[HEADER_BYTES];
    uint64_t version = 1, S = (uint64_t)w->nseq, D = (uint64_t)w->ndocs;
    memcpy(hdr, MAGIC, 9);
    memcpy(hdr + 9, &version, 8);
    hdr[17] = (uint8_t)w->dtype;
    memcpy(hdr + 18, &S, 8);
    memcpy(hdr + 26, &D, 8);
    int ok = fwrite(hdr, 1, sizeof hdr, f) == sizeof hdr;
    if (ok && w->nseq) ok = fwrite(w->lens, sizeof(int32_t), (size_t)w->nseq, f) == (size_t)w->nseq;
    int64_t ptr = 0;
    for (int64_t i = 0; ok && i < w->nseq; i++) {
        ok = fwrite(&ptr, 8, 1, f) == 1;
        ptr += (int64_t)w->lens[i] * w->itemsize;
    }
    if (ok) ok = fwrite(w->docs, sizeof(int64_t), (size_t)w->ndocs, f) == (size_t)w->ndocs;
    if (!ok) {
        lt_fail(err, errlen, "%s: write failed: %s", w->idx_tmp, strerror(errno));
        fclose(f);
        goto bad;
    }
    if (close_synced(f, w->idx_tmp, err, errlen) != 0) goto bad;
    /* .bin first: a visible .idx always has its .bin. */
    if (rename(w->bin_tmp, w->bin_path) != 0) {
        lt_fail(err, errlen, "%s: cannot rename to %s: %s", w->bin_tmp, w->bin_path, strerror(errno));
        goto bad;
    }
    if (rename(w->idx_tmp, w->idx_path) != 0) {
        lt_fail(err, errlen, "%s: cannot rename to %s: %s", w->idx_tmp, w->idx_path, strerror(errno));
        goto bad;
    }
    writer_free(w);
    return 0;
bad:
    lt_indexed_writer_abort(w);
    return -1;
}
