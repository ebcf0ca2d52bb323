/* safetensors reader (mmap + strict validation) and writer (tmp + fsync + rename). */
#define _POSIX_C_SOURCE 200809L
#include "engine/core/error.h"
#include "engine/io/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/io/json.h"

static const struct {
    const char *name;
    size_t size;
} dtypes[LT_ST_NDTYPES] = {
    [LT_ST_BOOL] = {"BOOL", 1},     [LT_ST_U8] = {"U8", 1},         [LT_ST_I8] = {"I8", 1},
    [LT_ST_F8_E5M2] = {"F8_E5M2", 1}, [LT_ST_F8_E4M3] = {"F8_E4M3", 1}, [LT_ST_F8_E8M0] = {"F8_E8M0", 1},
    [LT_ST_I16] = {"I16", 2},       [LT_ST_U16] = {"U16", 2},       [LT_ST_F16] = {"F16", 2},
    [LT_ST_BF16] = {"BF16", 2},     [LT_ST_I32] = {"I32", 4},       [LT_ST_U32] = {"U32", 4},
    [LT_ST_F32] = {"F32", 4},       [LT_ST_F64] = {"F64", 8},       [LT_ST_I64] = {"I64", 8},
    [LT_ST_U64] = {"U64", 8},       [LT_ST_C64] = {"C64", 8},
};

const char *lt_st_dtype_name(lt_st_dtype dt) {
    return (unsigned)dt < LT_ST_NDTYPES ? dtypes[dt].name : NULL;
}

size_t lt_st_dtype_size(lt_st_dtype dt) { return (unsigned)dt < LT_ST_NDTYPES ? dtypes[dt].size : 0; }

int lt_st_dtype_parse(const char *name, lt_st_dtype *out) {
    for (int i = 0; i < LT_ST_NDTYPES; i++)
        if (strcmp(name, dtypes[i].name) == 0) {
            *out = (lt_st_dtype)i;
            return 0;
        }
    return -1;
}

uint64_t lt_st_fnv1a(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* a*b into *out; 0 on success, -1 on overflow. */
static int mul_u64(uint64_t a, uint64_t b, uint64_t *out) {
    if (a && b > UINT64_MAX / a) return -1;
    *out = a * b;
    return 0;
}

/* "[4, 8]" for error messages. */
static void fmt_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t k = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < cap) snprintf(buf + k, cap - k, "]");
}

/* Element count and byte size of a shape; -1 on overflow. A zero dimension makes the
 * tensor empty whatever the other dimensions are. */
static int shape_bytes(int ndim, const int64_t *shape, size_t esize, uint64_t *numel, uint64_t *bytes) {
    uint64_t n = 1;
    for (int i = 0; i < ndim; i++)
        if (shape[i] == 0) n = 0;
    if (n)
        for (int i = 0; i < ndim; i++)
            if (mul_u64(n, (uint64_t)shape[i], &n)) return -1;
    *numel = n;
    return mul_u64(n, esize, bytes);
}

/* ================================================================ writer */

typedef struct {
    char *name;
    lt_st_dtype dtype;
    int ndim;
    int64_t shape[LT_ST_MAX_DIMS];
    const void *data;
    uint64_t nbytes;
} wtensor;

typedef struct {
    char *key, *value;
} wmeta;

struct lt_st_writer {
    wtensor *t;
    size_t nt, ct;
    wmeta *m;
    size_t nm, cm;
};

lt_st_writer *lt_st_writer_new(void) { return calloc(1, sizeof(lt_st_writer)); }

void lt_st_writer_free(lt_st_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->nt; i++) free(w->t[i].name);
    for (size_t i = 0; i < w->nm; i++) free(w->m[i].key), free(w->m[i].value);
    free(w->t);
    free(w->m);
    free(w);
}

static char *dupstr(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

int lt_st_writer_add(lt_st_writer *w, const char *name, lt_st_dtype dtype, int ndim,
                     const int64_t *shape, const void *data, char *err, size_t errlen) {
    if (!w || !name) return lt_fail(err, errlen, "safetensors writer: NULL writer or name");
    if (!*name) return lt_fail(err, errlen, "safetensors writer: empty tensor name");
    if (!lt_json_utf8_valid(name, strlen(name)))
        return lt_fail(err, errlen, "safetensors writer: tensor name is not valid UTF-8");
    if (strcmp(name, "__metadata__") == 0)
        return lt_fail(err, errlen, "safetensors writer: tensor name '__metadata__' is reserved");
    if (!lt_st_dtype_name(dtype))
        return lt_fail(err, errlen, "safetensors writer: tensor '%s': invalid dtype %d", name, (int)dtype);
    if (ndim < 0 || ndim > LT_ST_MAX_DIMS || (ndim && !shape))
        return lt_fail(err, errlen, "safetensors writer: tensor '%s': rank %d outside [0, %d]", name, ndim,
                      LT_ST_MAX_DIMS);
    wtensor t = {0};
    t.dtype = dtype;
    t.ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return lt_fail(err, errlen, "safetensors writer: tensor '%s': negative dimension %lld", name,
                          (long long)shape[i]);
        t.shape[i] = shape[i];
    }
    uint64_t numel;
    if (shape_bytes(ndim, t.shape, dtypes[dtype].size, &numel, &t.nbytes) || t.nbytes > (uint64_t)SIZE_MAX)
        return lt_fail(err, errlen, "safetensors writer: tensor '%s': size overflows", name);
    if (t.nbytes && !data) return lt_fail(err, errlen, "safetensors writer: tensor '%s': NULL data", name);
    t.data = data;
    if (w->nt == w->ct) {
        size_t c = w->ct ? w->ct * 2 : 16;
        wtensor *nt = realloc(w->t, c * sizeof *nt);
        if (!nt) return lt_fail(err, errlen, "safetensors writer: out of memory");
        w->t = nt;
        w->ct = c;
    }
    if (!(t.name = dupstr(name))) return lt_fail(err, errlen, "safetensors writer: out of memory");
    w->t[w->nt++] = t;
    return 0;
}

static int meta_push(lt_st_writer *w, const char *key, const char *value) {
    if (w->nm == w->cm) {
        size_t c = w->cm ? w->cm * 2 : 8;
        wmeta *nm = realloc(w->m, c * sizeof *nm);
        if (!nm) return -1;
        w->m = nm;
        w->cm = c;
    }
    wmeta m = {dupstr(key), dupstr(value)};
    if (!m.key || !m.value) {
        free(m.key);
        free(m.value);
        return -1;
    }
    w->m[w->nm++] = m;
    return 0;
}

int lt_st_writer_meta(lt_st_writer *w, const char *key, const char *value, char *err, size_t errlen) {
    if (!w || !key || !value) return lt_fail(err, errlen, "safetensors writer: NULL writer, key or value");
    if (!lt_json_utf8_valid(key, strlen(key)) || !lt_json_utf8_valid(value, strlen(value)))
        return lt_fail(err, errlen, "safetensors writer: metadata '%s' is not valid UTF-8", key);
    if (strcmp(key, LT_ST_CHECKSUM_KEY) == 0)
        return lt_fail(err, errlen, "safetensors writer: metadata key '%s' is reserved", key);
    if (meta_push(w, key, value)) return lt_fail(err, errlen, "safetensors writer: out of memory");
    return 0;
}

static int cmp_wtensor(const void *a, const void *b) {
    return strcmp(((const wtensor *)a)->name, ((const wtensor *)b)->name);
}
static int cmp_wmeta(const void *a, const void *b) {
    return strcmp(((const wmeta *)a)->key, ((const wmeta *)b)->key);
}

static void put_le64(unsigned char *b, uint64_t v) {
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(v >> (8 * i));
}

static void hex16(char *out, uint64_t h) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--, h >>= 4) out[i] = digits[h & 15];
}

/* Builds the padded header with a zeroed checksum; *ck_pos = offset of its 16 digits. */
static int build_header(lt_st_writer *w, lt_json_buf *b, size_t *ck_pos, uint64_t *data_len, const char *path,
                        char *err, size_t errlen) {
    lt_json_buf_puts(b, "{\"__metadata__\":{");
    int ck_done = 0;
    for (size_t i = 0; i <= w->nm; i++) {
        /* The checksum entry is merged in at its sorted place. */
        if (!ck_done && (i == w->nm || strcmp(LT_ST_CHECKSUM_KEY, w->m[i].key) < 0)) {
            if (i) lt_json_buf_raw(b, ",", 1);
            lt_json_buf_string(b, LT_ST_CHECKSUM_KEY);
            lt_json_buf_raw(b, ":\"", 2);
            *ck_pos = b->n;
            lt_json_buf_raw(b, "0000000000000000\"", 17);
            ck_done = 1;
        }
        if (i == w->nm) break;
        if (i || ck_done) lt_json_buf_raw(b, ",", 1);
        lt_json_buf_string(b, w->m[i].key);
        lt_json_buf_raw(b, ":", 1);
        lt_json_buf_string(b, w->m[i].value);
    }
    lt_json_buf_raw(b, "}", 1);
    uint64_t off = 0;
    for (size_t i = 0; i < w->nt; i++) {
        const wtensor *t = &w->t[i];
        lt_json_buf_raw(b, ",", 1);
        lt_json_buf_string(b, t->name);
        lt_json_buf_puts(b, ":{\"dtype\":\"");
        lt_json_buf_puts(b, dtypes[t->dtype].name);
        lt_json_buf_puts(b, "\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++) {
            if (d) lt_json_buf_raw(b, ",", 1);
            lt_json_buf_u64(b, (uint64_t)t->shape[d]);
        }
        lt_json_buf_puts(b, "],\"data_offsets\":[");
        lt_json_buf_u64(b, off);
        lt_json_buf_raw(b, ",", 1);
        if (off + t->nbytes < off) return lt_fail(err, errlen, "%s: total data size overflows", path);
        off += t->nbytes;
        lt_json_buf_u64(b, off);
        lt_json_buf_puts(b, "]}");
    }
    lt_json_buf_raw(b, "}", 1);
    /* Spaces up to a multiple of 8 so the data section is 8-byte aligned in the file. */
    while (!b->oom && b->n % 8) lt_json_buf_raw(b, " ", 1);
    if (b->oom) return lt_fail(err, errlen, "%s: out of memory building header", path);
    if (b->n > LT_ST_MAX_HEADER) return lt_fail(err, errlen, "%s: header of %zu bytes is too large", path, b->n);
    *data_len = off;
    return 0;
}

/* fsync of the directory makes the rename itself durable. Some filesystems refuse
 * fsync on directories; the file is already complete then, so this is best effort. */
static void sync_dir(const char *path) {
    const char *slash = strrchr(path, '/');
    char *dir;
    if (!slash) dir = dupstr(".");
    else if (slash == path) dir = dupstr("/");
    else {
        dir = malloc((size_t)(slash - path) + 1);
        if (dir) memcpy(dir, path, (size_t)(slash - path)), dir[slash - path] = 0;
    }
    if (!dir) return;
    int fd = open(dir, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(dir);
}

int lt_st_writer_write(lt_st_writer *w, const char *path, char *err, size_t errlen) {
    if (!w || !path) return lt_fail(err, errlen, "safetensors writer: NULL writer or path");
    /* qsort/bsearch get no NULL arrays, even with zero elements (undefined behaviour). */
    if (w->nt > 1) qsort(w->t, w->nt, sizeof *w->t, cmp_wtensor);
    if (w->nm > 1) qsort(w->m, w->nm, sizeof *w->m, cmp_wmeta);
    for (size_t i = 1; i < w->nt; i++)
        if (strcmp(w->t[i - 1].name, w->t[i].name) == 0)
            return lt_fail(err, errlen, "%s: duplicate tensor name '%s'", path, w->t[i].name);
    for (size_t i = 1; i < w->nm; i++)
        if (strcmp(w->m[i - 1].key, w->m[i].key) == 0)
            return lt_fail(err, errlen, "%s: duplicate metadata key '%s'", path, w->m[i].key);

    lt_json_buf hdr = {0};
    size_t ck_pos = 0;
    uint64_t data_len;
    if (build_header(w, &hdr, &ck_pos, &data_len, path, err, errlen)) {
        lt_json_buf_free(&hdr);
        return -1;
    }
    unsigned char prefix[8];
    put_le64(prefix, hdr.n);

    size_t plen = strlen(path);
    char *tmp = malloc(plen + 32);
    if (!tmp) {
        lt_json_buf_free(&hdr);
        return lt_fail(err, errlen, "%s: out of memory", path);
    }
    snprintf(tmp, plen + 32, "%s.tmp.%ld", path, (long)getpid());

    int rc = -1;
    FILE *fp = NULL;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        lt_fail(err, errlen, "%s: cannot create %s: %s", path, tmp, strerror(errno));
        goto out;
    }
    fp = fdopen(fd, "wb");
    if (!fp) {
        lt_fail(err, errlen, "%s: fdopen %s: %s", path, tmp, strerror(errno));
        close(fd);
        goto fail;
    }
    /* One pass over the data: hash and write each chunk together, then patch the
     * checksum digits in the already written header. */
    uint64_t h = lt_st_fnv1a(LT_ST_FNV_INIT, prefix, 8);
    h = lt_st_fnv1a(h, hdr.p, hdr.n);
    if (fwrite(prefix, 1, 8, fp) != 8 || fwrite(hdr.p, 1, hdr.n, fp) != hdr.n) goto io_fail;
    for (size_t i = 0; i < w->nt; i++) {
        const unsigned char *p = w->t[i].data;
        size_t left = (size_t)w->t[i].nbytes;
        while (left) {
            size_t k = left < (1u << 20) ? left : (1u << 20);
            h = lt_st_fnv1a(h, p, k);
            if (fwrite(p, 1, k, fp) != k) goto io_fail;
            p += k;
            left -= k;
        }
    }
    char digits[16];
    hex16(digits, h);
    if (fflush(fp) || fseek(fp, (long)(8 + ck_pos), SEEK_SET) || fwrite(digits, 1, 16, fp) != 16) goto io_fail;
    if (fflush(fp) || fsync(fileno(fp))) goto io_fail;
    {
        FILE *f = fp;
        fp = NULL;
        if (fclose(f)) {
            lt_fail(err, errlen, "%s: closing %s: %s", path, tmp, strerror(errno));
            goto fail;
        }
    }
    if (rename(tmp, path)) {
        lt_fail(err, errlen, "%s: rename from %s: %s", path, tmp, strerror(errno));
        goto fail;
    }
    sync_dir(path);
    (void)data_len;
    rc = 0;
    goto out;
io_fail:
    lt_fail(err, errlen, "%s: writing %s: %s", path, tmp, errno ? strerror(errno) : "I/O error");
fail:
    if (fp) fclose(fp);
    unlink(tmp);
out:
    free(tmp);
    lt_json_buf_free(&hdr);
    return rc;
}

/* ================================================================ reader */

typedef struct {
    const char *key, *value;
} rmeta;

struct lt_st_file {
    void *map;
    size_t map_len;
    char *strs; /* decoded JSON strings; names and metadata point here */
    lt_st_tensor *t;
    size_t nt;
    rmeta *m;
    size_t nm;
    int verified;
};

void lt_st_close(lt_st_file *f) {
    if (!f) return;
    if (f->map) munmap(f->map, f->map_len);
    free(f->strs);
    free(f->t);
    free(f->m);
    free(f);
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const lt_st_tensor *)a)->name, ((const lt_st_tensor *)b)->name);
}
static int cmp_rmeta(const void *a, const void *b) {
    return strcmp(((const rmeta *)a)->key, ((const rmeta *)b)->key);
}
static int cmp_tensor_off(const void *a, const void *b) {
    const lt_st_tensor *x = *(const lt_st_tensor *const *)a, *y = *(const lt_st_tensor *const *)b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return 0;
}

/* Reads one tensor entry (node `nd`, name `name`) into *t; offsets checked against dlen. */
static int read_tensor(const lt_json_doc *doc, size_t nd, const char *name, const unsigned char *data,
                       uint64_t dlen, lt_st_tensor *t, const char *path, char *err, size_t errlen) {
    const lt_json_node *obj = &doc->nodes[nd];
    if (obj->type != LT_JSON_OBJECT)
        return lt_fail(err, errlen, "%s: tensor '%s': entry is not an object", path, name);
    size_t n_dtype = LT_JSON_NONE, n_shape = LT_JSON_NONE, n_off = LT_JSON_NONE;
    for (size_t c = obj->first; c != LT_JSON_NONE; c = doc->nodes[c].next) {
        const char *k = lt_json_key(doc, c);
        size_t *slot = strcmp(k, "dtype") == 0 ? &n_dtype
                       : strcmp(k, "shape") == 0 ? &n_shape
                       : strcmp(k, "data_offsets") == 0 ? &n_off
                                                        : NULL;
        if (!slot) return lt_fail(err, errlen, "%s: tensor '%s': unknown field '%s'", path, name, k);
        if (*slot != LT_JSON_NONE)
            return lt_fail(err, errlen, "%s: tensor '%s': duplicate field '%s'", path, name, k);
        *slot = c;
    }
    if (n_dtype == LT_JSON_NONE || n_shape == LT_JSON_NONE || n_off == LT_JSON_NONE)
        return lt_fail(err, errlen, "%s: tensor '%s': missing %s", path, name,
                      n_dtype == LT_JSON_NONE ? "dtype" : n_shape == LT_JSON_NONE ? "shape" : "data_offsets");
    t->name = name;

    const char *dt = lt_json_str(doc, n_dtype);
    if (!dt) return lt_fail(err, errlen, "%s: tensor '%s': dtype is not a string", path, name);
    if (lt_st_dtype_parse(dt, &t->dtype))
        return lt_fail(err, errlen, "%s: tensor '%s': unknown dtype '%s'", path, name, dt);

    const lt_json_node *sh = &doc->nodes[n_shape];
    if (sh->type != LT_JSON_ARRAY) return lt_fail(err, errlen, "%s: tensor '%s': shape is not an array", path, name);
    if (sh->len > LT_ST_MAX_DIMS)
        return lt_fail(err, errlen, "%s: tensor '%s': shape has %zu dimensions (at most %d)", path, name, sh->len,
                      LT_ST_MAX_DIMS);
    t->ndim = 0;
    for (size_t c = sh->first; c != LT_JSON_NONE; c = doc->nodes[c].next) {
        const lt_json_node *d = &doc->nodes[c];
        if (d->type != LT_JSON_INT || d->neg || d->mag > (uint64_t)INT64_MAX)
            return lt_fail(err, errlen, "%s: tensor '%s': shape entry %d is not a non-negative integer", path, name,
                          t->ndim);
        t->shape[t->ndim++] = (int64_t)d->mag;
    }

    const lt_json_node *of = &doc->nodes[n_off];
    if (of->type != LT_JSON_ARRAY || of->len != 2)
        return lt_fail(err, errlen, "%s: tensor '%s': data_offsets is not [begin, end]", path, name);
    const lt_json_node *b = &doc->nodes[of->first], *e = &doc->nodes[b->next];
    if (b->type != LT_JSON_INT || e->type != LT_JSON_INT || b->neg || e->neg)
        return lt_fail(err, errlen, "%s: tensor '%s': data_offsets are not non-negative integers", path, name);
    if (b->mag > e->mag)
        return lt_fail(err, errlen, "%s: tensor '%s': data_offsets [%llu, %llu] end before they begin", path,
                      name, (unsigned long long)b->mag, (unsigned long long)e->mag);
    if (e->mag > dlen)
        return lt_fail(err, errlen, "%s: tensor '%s': data_offsets [%llu, %llu] run past the %llu-byte data section",
                      path, name, (unsigned long long)b->mag, (unsigned long long)e->mag, (unsigned long long)dlen);

    char shs[256];
    uint64_t bytes;
    fmt_shape(shs, sizeof shs, t->ndim, t->shape);
    if (shape_bytes(t->ndim, t->shape, dtypes[t->dtype].size, &t->numel, &bytes))
        return lt_fail(err, errlen, "%s: tensor '%s': size of shape %s of %s overflows", path, name, shs, dt);
    if (e->mag - b->mag != bytes)
        return lt_fail(err, errlen, "%s: tensor '%s': data_offsets [%llu, %llu] do not match shape %s of %s (%llu bytes)",
                      path, name, (unsigned long long)b->mag, (unsigned long long)e->mag, shs, dt,
                      (unsigned long long)bytes);
    t->offset = b->mag;
    t->nbytes = (size_t)bytes; /* <= dlen, which fits in size_t */
    t->data = data + b->mag;
    return 0;
}

/* Checks luatron.checksum (raw value node `vn`): the digits must be exactly 16 lowercase
 * hex characters, unescaped, so the span to read as zeros is unambiguous. */
static int check_checksum(const lt_json_node *vn, const unsigned char *map, size_t size, int verify,
                          const char *path, char *err, size_t errlen) {
    size_t pos = 8 + vn->pos + 1; /* first digit, in file coordinates */
    uint64_t want = 0;
    if (vn->type != LT_JSON_STRING || vn->end - vn->pos != 18)
        return lt_fail(err, errlen, "%s: malformed %s (want 16 lowercase hex digits)", path, LT_ST_CHECKSUM_KEY);
    for (int i = 0; i < 16; i++) {
        unsigned char c = map[pos + i];
        unsigned v;
        if (c >= '0' && c <= '9') v = c - '0';
        else if (c >= 'a' && c <= 'f') v = c - 'a' + 10;
        else
            return lt_fail(err, errlen, "%s: malformed %s (want 16 lowercase hex digits)", path,
                          LT_ST_CHECKSUM_KEY);
        want = (want << 4) | v;
    }
    if (!verify) return 0;
    static const char zeros[16] = "0000000000000000";
    uint64_t h = lt_st_fnv1a(LT_ST_FNV_INIT, map, pos);
    h = lt_st_fnv1a(h, zeros, 16);
    h = lt_st_fnv1a(h, map + pos + 16, size - pos - 16);
    if (h != want)
        return lt_fail(err, errlen, "%s: checksum mismatch (file says %016llx, contents hash to %016llx): file is corrupt",
                      path, (unsigned long long)want, (unsigned long long)h);
    return 0;
}

static int parse_file(lt_st_file *f, const unsigned char *map, size_t size, unsigned flags, const char *path,
                      char *err, size_t errlen) {
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) hlen |= (uint64_t)map[i] << (8 * i);
    if (hlen > size - 8)
        return lt_fail(err, errlen, "%s: header size %llu exceeds the %zu bytes after the size field", path,
                      (unsigned long long)hlen, size - 8);
    if (hlen > LT_ST_MAX_HEADER)
        return lt_fail(err, errlen, "%s: header size %llu is over the %u-byte limit", path, (unsigned long long)hlen,
                      LT_ST_MAX_HEADER);
    if (hlen < 2) return lt_fail(err, errlen, "%s: header size %llu is too small", path, (unsigned long long)hlen);
    if (map[8] != '{') return lt_fail(err, errlen, "%s: header does not start with '{'", path);

    const unsigned char *data = map + 8 + hlen;
    uint64_t dlen = size - 8 - hlen;
    lt_json_doc doc;
    char jerr[128];
    /* Depth 4 covers {name: {shape: [..]}} with one level to spare; each tensor needs
     * about 2 + ndim + 3 nodes, so 4M nodes allow several hundred thousand tensors while
     * bounding memory for hostile headers. */
    if (lt_json_parse(&doc, (const char *)map + 8, (size_t)hlen, 4, (size_t)1 << 22, jerr, sizeof jerr)) {
        lt_json_free(&doc);
        return lt_fail(err, errlen, "%s: bad header JSON: %s", path, jerr);
    }
    int rc = -1;
    lt_st_tensor **by_off = NULL;
    const lt_json_node *root = &doc.nodes[0];
    size_t meta_node = LT_JSON_NONE, ck_node = LT_JSON_NONE;
    if (root->type != LT_JSON_OBJECT) {
        lt_fail(err, errlen, "%s: header is not a JSON object", path);
        goto out;
    }
    size_t ntens = root->len;
    for (size_t c = root->first; c != LT_JSON_NONE; c = doc.nodes[c].next)
        if (strcmp(lt_json_key(&doc, c), "__metadata__") == 0) {
            if (meta_node != LT_JSON_NONE) {
                lt_fail(err, errlen, "%s: duplicate __metadata__", path);
                goto out;
            }
            meta_node = c;
            ntens--;
        }
    f->t = calloc(ntens ? ntens : 1, sizeof *f->t);
    by_off = malloc((ntens ? ntens : 1) * sizeof *by_off);
    if (!f->t || !by_off) {
        lt_fail(err, errlen, "%s: out of memory", path);
        goto out;
    }
    for (size_t c = root->first; c != LT_JSON_NONE; c = doc.nodes[c].next) {
        if (c == meta_node) continue;
        const char *name = lt_json_key(&doc, c);
        if (read_tensor(&doc, c, name, data, dlen, &f->t[f->nt], path, err, errlen)) goto out;
        f->nt++;
    }

    if (meta_node != LT_JSON_NONE) {
        const lt_json_node *mo = &doc.nodes[meta_node];
        if (mo->type != LT_JSON_OBJECT) {
            lt_fail(err, errlen, "%s: __metadata__ is not an object", path);
            goto out;
        }
        f->m = calloc(mo->len ? mo->len : 1, sizeof *f->m);
        if (!f->m) {
            lt_fail(err, errlen, "%s: out of memory", path);
            goto out;
        }
        for (size_t c = mo->first; c != LT_JSON_NONE; c = doc.nodes[c].next) {
            const char *k = lt_json_key(&doc, c), *v = lt_json_str(&doc, c);
            if (!v) {
                lt_fail(err, errlen, "%s: __metadata__ value of '%s' is not a string", path, k);
                goto out;
            }
            if (strcmp(k, LT_ST_CHECKSUM_KEY) == 0) ck_node = c;
            f->m[f->nm].key = k;
            f->m[f->nm].value = v;
            f->nm++;
        }
        qsort(f->m, f->nm, sizeof *f->m, cmp_rmeta);
        for (size_t i = 1; i < f->nm; i++)
            if (strcmp(f->m[i - 1].key, f->m[i].key) == 0) {
                lt_fail(err, errlen, "%s: duplicate metadata key '%s'", path, f->m[i].key);
                goto out;
            }
    }

    qsort(f->t, f->nt, sizeof *f->t, cmp_tensor_name);
    for (size_t i = 1; i < f->nt; i++)
        if (strcmp(f->t[i - 1].name, f->t[i].name) == 0) {
            lt_fail(err, errlen, "%s: duplicate tensor name '%s'", path, f->t[i].name);
            goto out;
        }

    /* The data section must be covered exactly: no overlaps (two tensors sharing bytes),
     * no gaps and nothing after the last tensor, as the format requires. */
    for (size_t i = 0; i < f->nt; i++) by_off[i] = &f->t[i];
    qsort(by_off, f->nt, sizeof *by_off, cmp_tensor_off);
    uint64_t cur = 0;
    for (size_t i = 0; i < f->nt; i++) {
        const lt_st_tensor *t = by_off[i];
        if (t->offset < cur) {
            lt_fail(err, errlen, "%s: tensor '%s': data_offsets [%llu, %llu] overlap tensor '%s'", path, t->name,
                   (unsigned long long)t->offset, (unsigned long long)(t->offset + t->nbytes), by_off[i - 1]->name);
            goto out;
        }
        if (t->offset > cur) {
            lt_fail(err, errlen, "%s: tensor '%s': gap of %llu unused bytes before data_offsets [%llu, %llu]", path,
                   t->name, (unsigned long long)(t->offset - cur), (unsigned long long)t->offset,
                   (unsigned long long)(t->offset + t->nbytes));
            goto out;
        }
        cur = t->offset + t->nbytes;
    }
    if (cur != dlen) {
        lt_fail(err, errlen, "%s: data section has %llu bytes but tensors cover %llu (truncated or trailing bytes)",
               path, (unsigned long long)dlen, (unsigned long long)cur);
        goto out;
    }

    if (ck_node != LT_JSON_NONE) {
        int verify = !(flags & LT_ST_NO_VERIFY);
        if (check_checksum(&doc.nodes[ck_node], map, size, verify, path, err, errlen)) goto out;
        f->verified = verify;
    } else if (flags & LT_ST_REQUIRE_CHECKSUM) {
        lt_fail(err, errlen, "%s: no %s in metadata", path, LT_ST_CHECKSUM_KEY);
        goto out;
    }
    rc = 0;
out:
    free(by_off);
    /* Names and metadata point into the string arena: keep it, drop the nodes. */
    f->strs = doc.strs;
    doc.strs = NULL;
    lt_json_free(&doc);
    return rc;
}

lt_st_file *lt_st_open(const char *path, char *err, size_t errlen) { return lt_st_open_ex(path, 0, err, errlen); }

lt_st_file *lt_st_open_ex(const char *path, unsigned flags, char *err, size_t errlen) {
    if (!path) {
        lt_fail(err, errlen, "safetensors: NULL path");
        return NULL;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        lt_fail(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st)) {
        lt_fail(err, errlen, "%s: stat: %s", path, strerror(errno));
        close(fd);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        lt_fail(err, errlen, "%s: not a regular file", path);
        close(fd);
        return NULL;
    }
    if (st.st_size < 8) {
        lt_fail(err, errlen, "%s: file is %lld bytes, too short for the 8-byte header size", path,
               (long long)st.st_size);
        close(fd);
        return NULL;
    }
    if ((uint64_t)st.st_size > (uint64_t)SIZE_MAX) {
        lt_fail(err, errlen, "%s: file too large to map", path);
        close(fd);
        return NULL;
    }
    size_t size = (size_t)st.st_size;
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd); /* the mapping keeps the file alive */
    if (map == MAP_FAILED) {
        lt_fail(err, errlen, "%s: mmap: %s", path, strerror(errno));
        return NULL;
    }
    lt_st_file *f = calloc(1, sizeof *f);
    if (!f) {
        munmap(map, size);
        lt_fail(err, errlen, "%s: out of memory", path);
        return NULL;
    }
    f->map = map;
    f->map_len = size;
    if (parse_file(f, map, size, flags, path, err, errlen)) {
        lt_st_close(f);
        return NULL;
    }
    return f;
}

size_t lt_st_count(const lt_st_file *f) { return f ? f->nt : 0; }

const lt_st_tensor *lt_st_tensor_at(const lt_st_file *f, size_t i) { return f && i < f->nt ? &f->t[i] : NULL; }

const char *lt_st_name(const lt_st_file *f, size_t i) { return f && i < f->nt ? f->t[i].name : NULL; }

const lt_st_tensor *lt_st_find(const lt_st_file *f, const char *name) {
    if (!f || !name || !f->nt) return NULL;
    lt_st_tensor key;
    key.name = name;
    return bsearch(&key, f->t, f->nt, sizeof *f->t, cmp_tensor_name);
}

size_t lt_st_meta_count(const lt_st_file *f) { return f ? f->nm : 0; }

int lt_st_meta_at(const lt_st_file *f, size_t i, const char **key, const char **value) {
    if (!f || i >= f->nm) return -1;
    if (key) *key = f->m[i].key;
    if (value) *value = f->m[i].value;
    return 0;
}

const char *lt_st_meta(const lt_st_file *f, const char *key) {
    if (!f || !key) return NULL;
    if (!f->nm) return NULL;
    rmeta k = {key, NULL};
    const rmeta *m = bsearch(&k, f->m, f->nm, sizeof *f->m, cmp_rmeta);
    return m ? m->value : NULL;
}

int lt_st_verified(const lt_st_file *f) { return f ? f->verified : 0; }
