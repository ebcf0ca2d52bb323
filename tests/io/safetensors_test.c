/* safetensors writer/reader: round trips, exact bytes, atomic writes, and corruption of
 * every kind (each must give an error message, never a crash). */
#define _POSIX_C_SOURCE 200809L
#include "engine/io/safetensors.h"

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/tap.h"

static char dir[512];
static char err[1024];

static const char *tpath(const char *name) {
    static char buf[8][700];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, sizeof buf[0], "%s/%s", dir, name);
    return p;
}

static int write_bytes(const char *path, const void *buf, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = n ? fwrite(buf, 1, n, f) : 0;
    return fclose(f) || w != n ? -1 : 0;
}

static unsigned char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(sz ? (size_t)sz : 1);
    *n = fread(b, 1, (size_t)sz, f);
    fclose(f);
    return b;
}

/* Independent FNV-1a so the exact-bytes test does not trust the library's. */
static uint64_t fnv(const unsigned char *p, size_t n) {
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* Position of needle in hay, or -1. */
static long find_bytes(const unsigned char *hay, size_t n, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(hay + i, needle, k) == 0) return (long)i;
    return -1;
}

/* Count of directory entries starting with prefix (tmp files left behind). */
static int count_prefix(const char *prefix) {
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) n++;
    if (d) closedir(d);
    return n;
}

/* Writes a file from a header (space-padded to 8 bytes) and data; no checksum. */
static const char *make_file(const char *name, const char *header, const void *data, size_t dlen) {
    size_t hl = strlen(header), pl = (hl + 7) / 8 * 8;
    unsigned char *b = calloc(1, 8 + pl + dlen + 1);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)pl >> (8 * i));
    memcpy(b + 8, header, hl);
    memset(b + 8 + hl, ' ', pl - hl);
    if (dlen) memcpy(b + 8 + pl, data, dlen);
    const char *p = tpath(name);
    write_bytes(p, b, 8 + pl + dlen);
    free(b);
    return p;
}

/* Opening must fail with a message naming the file and containing `want`. */
static void expect_fail(const char *path, unsigned flags, const char *want, const char *what) {
    err[0] = 0;
    lt_st_file *f = lt_st_open_ex(path, flags, err, sizeof err);
    TAP_CHECK(!f && strstr(err, path) && strstr(err, want), "%s: error '%s' (want '%s')", what, err, want);
    lt_st_close(f);
}

static const uint8_t DATA_F32[] = {0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0}; /* 1.0f, -2.0f */

/* ---------------------------------------------------------------- round trip */

static void test_round_trip(void) {
    float a[6] = {1, 2, 3, 4, 5, -6.5f};
    uint16_t bf[4] = {0x3f80, 0x4000, 0xbf80, 0x7fc0};
    int64_t i64[4] = {INT64_MIN, -1, 0, INT64_MAX};
    uint8_t u8[5] = {1, 2, 3, 4, 255};
    int32_t scalar = -42;
    uint8_t bools[3] = {1, 0, 1};
    double f64[2] = {3.25, -1e300};

    lt_st_writer *w = lt_st_writer_new();
    int64_t s23[] = {2, 3}, s4[] = {4}, s22[] = {2, 2}, s5[] = {5}, s03[] = {0, 3}, s3[] = {3}, s2[] = {2},
            s500[] = {5, 0, 0};
    int rc = 0;
    rc |= lt_st_writer_add(w, "model.layers.0.weight", LT_ST_F32, 2, s23, a, err, sizeof err);
    rc |= lt_st_writer_add(w, "bf", LT_ST_BF16, 1, s4, bf, err, sizeof err);
    rc |= lt_st_writer_add(w, "ids", LT_ST_I64, 2, s22, i64, err, sizeof err);
    rc |= lt_st_writer_add(w, "bytes", LT_ST_U8, 1, s5, u8, err, sizeof err);
    rc |= lt_st_writer_add(w, "scalar", LT_ST_I32, 0, NULL, &scalar, err, sizeof err);
    rc |= lt_st_writer_add(w, "empty", LT_ST_F16, 2, s03, NULL, err, sizeof err);
    rc |= lt_st_writer_add(w, "empty2", LT_ST_F32, 3, s500, NULL, err, sizeof err);
    rc |= lt_st_writer_add(w, "mask", LT_ST_BOOL, 1, s3, bools, err, sizeof err);
    rc |= lt_st_writer_add(w, "d\"q\\\xc3\xa9\n", LT_ST_F64, 1, s2, f64, err, sizeof err);
    rc |= lt_st_writer_meta(w, "format", "pt", err, sizeof err);
    rc |= lt_st_writer_meta(w, "step", "100", err, sizeof err);
    rc |= lt_st_writer_meta(w, "weird", "quote\" back\\ nl\n tab\t ctl\x01 \xc3\xa9 \xe2\x9c\x93", err, sizeof err);
    TAP_CHECK(rc == 0, "writer accepts tensors and metadata (%s)", rc ? err : "");
    const char *p = tpath("rt.safetensors");
    rc = lt_st_writer_write(w, p, err, sizeof err);
    TAP_CHECK(rc == 0, "write round-trip file (%s)", rc ? err : "");
    lt_st_writer_free(w);

    lt_st_file *f = lt_st_open(p, err, sizeof err);
    TAP_CHECK(f != NULL, "open round-trip file (%s)", f ? "" : err);
    if (!f) return;
    TAP_CHECK(lt_st_verified(f) == 1, "checksum verified on open");
    TAP_CHECK(lt_st_count(f) == 9, "9 tensors (got %zu)", lt_st_count(f));
    int sorted = 1;
    for (size_t i = 1; i < lt_st_count(f); i++) sorted &= strcmp(lt_st_name(f, i - 1), lt_st_name(f, i)) < 0;
    TAP_CHECK(sorted, "names iterate in sorted order");
    TAP_CHECK(lt_st_name(f, 99) == NULL && lt_st_tensor_at(f, 99) == NULL, "out-of-range index gives NULL");

    const lt_st_tensor *t = lt_st_find(f, "model.layers.0.weight");
    TAP_CHECK(t && t->dtype == LT_ST_F32 && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3 &&
                  t->nbytes == 24 && t->numel == 6 && memcmp(t->data, a, 24) == 0,
              "F32 [2,3] round trip");
    t = lt_st_find(f, "bf");
    TAP_CHECK(t && t->dtype == LT_ST_BF16 && t->ndim == 1 && t->shape[0] == 4 && t->nbytes == 8 &&
                  memcmp(t->data, bf, 8) == 0,
              "BF16 [4] round trip");
    t = lt_st_find(f, "ids");
    TAP_CHECK(t && t->dtype == LT_ST_I64 && t->nbytes == 32 && memcmp(t->data, i64, 32) == 0, "I64 [2,2] round trip");
    t = lt_st_find(f, "bytes");
    TAP_CHECK(t && t->dtype == LT_ST_U8 && t->nbytes == 5 && memcmp(t->data, u8, 5) == 0, "U8 [5] round trip");
    t = lt_st_find(f, "scalar");
    TAP_CHECK(t && t->dtype == LT_ST_I32 && t->ndim == 0 && t->numel == 1 && t->nbytes == 4 &&
                  memcmp(t->data, &scalar, 4) == 0,
              "scalar (shape []) round trip");
    t = lt_st_find(f, "empty");
    TAP_CHECK(t && t->dtype == LT_ST_F16 && t->ndim == 2 && t->shape[0] == 0 && t->shape[1] == 3 &&
                  t->nbytes == 0 && t->numel == 0,
              "zero-size F16 [0,3] round trip");
    t = lt_st_find(f, "empty2");
    TAP_CHECK(t && t->ndim == 3 && t->shape[0] == 5 && t->nbytes == 0, "zero-size F32 [5,0,0] round trip");
    t = lt_st_find(f, "mask");
    TAP_CHECK(t && t->dtype == LT_ST_BOOL && t->nbytes == 3 && memcmp(t->data, bools, 3) == 0, "BOOL round trip");
    t = lt_st_find(f, "d\"q\\\xc3\xa9\n");
    TAP_CHECK(t && t->dtype == LT_ST_F64 && t->nbytes == 16 && memcmp(t->data, f64, 16) == 0,
              "F64 with escaped/UTF-8 name round trip");
    TAP_CHECK(lt_st_find(f, "nope") == NULL, "unknown name not found");

    TAP_CHECK(lt_st_meta_count(f) == 4, "3 metadata pairs + checksum (got %zu)", lt_st_meta_count(f));
    const char *v = lt_st_meta(f, "format");
    TAP_CHECK(v && strcmp(v, "pt") == 0, "metadata format=pt");
    v = lt_st_meta(f, "step");
    TAP_CHECK(v && strcmp(v, "100") == 0, "metadata step=100");
    v = lt_st_meta(f, "weird");
    TAP_CHECK(v && strcmp(v, "quote\" back\\ nl\n tab\t ctl\x01 \xc3\xa9 \xe2\x9c\x93") == 0,
              "metadata with escapes and UTF-8 round trips");
    v = lt_st_meta(f, LT_ST_CHECKSUM_KEY);
    TAP_CHECK(v && strlen(v) == 16, "checksum metadata present");
    TAP_CHECK(lt_st_meta(f, "missing") == NULL, "unknown metadata key gives NULL");
    const char *k0 = NULL, *v0 = NULL;
    TAP_CHECK(lt_st_meta_at(f, 0, &k0, &v0) == 0 && strcmp(k0, "format") == 0 && lt_st_meta_at(f, 4, &k0, &v0) == -1,
              "metadata iterates in key order");
    lt_st_close(f);

    /* Deterministic: the same inputs written again give identical bytes. */
    size_t n1, n2;
    unsigned char *b1 = read_all(p, &n1);
    w = lt_st_writer_new();
    lt_st_writer_add(w, "bytes", LT_ST_U8, 1, s5, u8, err, sizeof err);
    lt_st_writer_add(w, "bf", LT_ST_BF16, 1, s4, bf, err, sizeof err);
    lt_st_writer_write(w, tpath("det1.safetensors"), err, sizeof err);
    lt_st_writer_free(w);
    w = lt_st_writer_new();
    lt_st_writer_add(w, "bf", LT_ST_BF16, 1, s4, bf, err, sizeof err);
    lt_st_writer_add(w, "bytes", LT_ST_U8, 1, s5, u8, err, sizeof err);
    lt_st_writer_write(w, tpath("det2.safetensors"), err, sizeof err);
    lt_st_writer_free(w);
    unsigned char *d1 = read_all(tpath("det1.safetensors"), &n1), *d2 = read_all(tpath("det2.safetensors"), &n2);
    TAP_CHECK(d1 && d2 && n1 == n2 && memcmp(d1, d2, n1) == 0, "insertion order does not change the bytes");
    free(b1);
    free(d1);
    free(d2);
}

/* ---------------------------------------------------------------- exact bytes */

/* Expected file, built by hand from the format description: compact JSON, metadata
 * first (sorted keys), tensors in name order with back-to-back offsets, header padded
 * with spaces to a multiple of 8, little-endian data. */
static void test_exact_bytes(void) {
    const char *hdr = "{\"__metadata__\":{\"k\":\"v\",\"luatron.checksum\":\"0000000000000000\"},"
                      "\"a\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[3,11]}}";
    size_t hl = strlen(hdr), pl = (hl + 7) / 8 * 8;
    unsigned char exp[512] = {0};
    size_t n = 8 + pl + 11;
    for (int i = 0; i < 8; i++) exp[i] = (unsigned char)((uint64_t)pl >> (8 * i));
    memcpy(exp + 8, hdr, hl);
    memset(exp + 8 + hl, ' ', pl - hl);
    const unsigned char data[11] = {1, 2, 3, 0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0};
    memcpy(exp + 8 + pl, data, 11);
    uint64_t h = fnv(exp, n); /* digits still '0' */
    long pos = find_bytes(exp, n, "0000000000000000");
    char hex[17];
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)h);
    memcpy(exp + pos, hex, 16);

    uint8_t u8[3] = {1, 2, 3};
    float f32[2] = {1.0f, -2.0f};
    int64_t s3[] = {3}, s2[] = {2};
    lt_st_writer *w = lt_st_writer_new();
    lt_st_writer_add(w, "b", LT_ST_F32, 1, s2, f32, err, sizeof err);
    lt_st_writer_add(w, "a", LT_ST_U8, 1, s3, u8, err, sizeof err);
    lt_st_writer_meta(w, "k", "v", err, sizeof err);
    const char *p = tpath("exact.safetensors");
    int rc = lt_st_writer_write(w, p, err, sizeof err);
    lt_st_writer_free(w);
    size_t got_n = 0;
    unsigned char *got = read_all(p, &got_n);
    TAP_CHECK(rc == 0 && got && got_n == n && memcmp(got, exp, n) == 0, "tiny file matches hand-built bytes (%zu vs %zu)",
              got_n, n);
    TAP_CHECK((8 + pl) % 8 == 0 && pl % 8 == 0, "data section starts 8-byte aligned");
    free(got);

    /* The reader accepts the hand-built buffer too. */
    write_bytes(tpath("exact2.safetensors"), exp, n);
    lt_st_file *f = lt_st_open_ex(tpath("exact2.safetensors"), LT_ST_REQUIRE_CHECKSUM, err, sizeof err);
    const lt_st_tensor *t = f ? lt_st_find(f, "b") : NULL;
    TAP_CHECK(t && t->nbytes == 8 && memcmp(t->data, DATA_F32, 8) == 0 && lt_st_verified(f),
              "hand-built file reads back (%s)", f ? "" : err);
    lt_st_close(f);
}

/* Files as other writers produce them: no checksum, metadata anywhere, whitespace. */
static void test_foreign(void) {
    const char *p = make_file("foreign.safetensors",
                              "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                              "\"__metadata__\":{\"format\":\"pt\"}}",
                              DATA_F32, 8);
    lt_st_file *f = lt_st_open(p, err, sizeof err);
    const lt_st_tensor *t = f ? lt_st_find(f, "w") : NULL;
    TAP_CHECK(t && t->nbytes == 8 && memcmp(t->data, DATA_F32, 8) == 0 && !lt_st_verified(f) &&
                  strcmp(lt_st_meta(f, "format"), "pt") == 0,
              "reference-style file without checksum reads (%s)", f ? "" : err);
    lt_st_close(f);
    expect_fail(p, LT_ST_REQUIRE_CHECKSUM, "no luatron.checksum", "REQUIRE_CHECKSUM rejects foreign file");

    p = make_file("pretty.safetensors",
                  "{\n  \"x\\u00e9\\ud83d\\ude00\" : {\"dtype\" : \"F32\",\n \"shape\": [ 2 ],\t\"data_offsets\":[0, 8]},\r\n"
                  "  \"e\": {\"data_offsets\": [8, 9], \"shape\": [], \"dtype\": \"U8\"}\n}",
                  "\0\0\x80\x3f\0\0\0\xc0\x07", 9);
    f = lt_st_open(p, err, sizeof err);
    t = f ? lt_st_find(f, "x\xc3\xa9\xf0\x9f\x98\x80") : NULL;
    const lt_st_tensor *e = f ? lt_st_find(f, "e") : NULL;
    TAP_CHECK(t && t->nbytes == 8 && e && e->ndim == 0 && e->nbytes == 1 && *(const uint8_t *)e->data == 7 &&
                  lt_st_meta_count(f) == 0,
              "whitespace, escaped names and any field order are accepted (%s)", f ? "" : err);
    lt_st_close(f);

    p = make_file("empty.safetensors", "{}", NULL, 0);
    f = lt_st_open(p, err, sizeof err);
    TAP_CHECK(f && lt_st_count(f) == 0, "empty header {} is a valid file with no tensors");
    lt_st_close(f);
}

/* ---------------------------------------------------------------- atomic write */

static void test_atomic(void) {
    float x[2] = {1, 2}, y[3] = {3, 4, 5};
    int64_t s2[] = {2}, s3[] = {3};
    const char *p = tpath("atomic.safetensors");
    lt_st_writer *w = lt_st_writer_new();
    lt_st_writer_add(w, "x", LT_ST_F32, 1, s2, x, err, sizeof err);
    int rc = lt_st_writer_write(w, p, err, sizeof err);
    lt_st_writer_free(w);
    TAP_CHECK(rc == 0 && access(p, F_OK) == 0, "file exists under its real name");
    TAP_CHECK(count_prefix("atomic.safetensors.tmp.") == 0, "no tmp file left behind");

    /* Overwrite: the new contents replace the old. */
    w = lt_st_writer_new();
    lt_st_writer_add(w, "y", LT_ST_F32, 1, s3, y, err, sizeof err);
    rc = lt_st_writer_write(w, p, err, sizeof err);
    TAP_CHECK(rc == 0 && count_prefix("atomic.safetensors.tmp.") == 0, "overwrite leaves no tmp file");
    lt_st_file *f = lt_st_open(p, err, sizeof err);
    TAP_CHECK(f && lt_st_count(f) == 1 && lt_st_find(f, "y") && !lt_st_find(f, "x"), "overwrite replaced contents");
    lt_st_close(f);

    /* Rename fails (target is a directory): error, tmp removed, directory untouched. */
    const char *dpath = tpath("adir");
    mkdir(dpath, 0755);
    rc = lt_st_writer_write(w, dpath, err, sizeof err);
    TAP_CHECK(rc == -1 && strstr(err, dpath) && strstr(err, "rename"), "rename failure reported: %s", err);
    TAP_CHECK(count_prefix("adir.tmp.") == 0, "failed write removes its tmp file");

    /* Cannot create the tmp file (missing directory). */
    const char *np = tpath("no/such/dir/x.safetensors");
    rc = lt_st_writer_write(w, np, err, sizeof err);
    TAP_CHECK(rc == -1 && strstr(err, np), "missing directory reported: %s", err);
    lt_st_writer_free(w);
    rmdir(dpath);
}

/* ---------------------------------------------------------------- writer errors */

static void test_writer_errors(void) {
    float x[4] = {0};
    int64_t s2[] = {2}, neg[] = {2, -1}, big[] = {INT64_MAX, 4}, s9[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    lt_st_writer *w = lt_st_writer_new();
    TAP_CHECK(lt_st_writer_add(w, "n", LT_ST_F32, 2, neg, x, err, sizeof err) == -1 && strstr(err, "negative"),
              "negative dimension rejected: %s", err);
    TAP_CHECK(lt_st_writer_add(w, "n", LT_ST_F32, 9, s9, x, err, sizeof err) == -1, "rank 9 rejected: %s", err);
    TAP_CHECK(lt_st_writer_add(w, "n", LT_ST_F32, 2, big, x, err, sizeof err) == -1 && strstr(err, "overflow"),
              "size overflow rejected: %s", err);
    TAP_CHECK(lt_st_writer_add(w, "n", (lt_st_dtype)99, 1, s2, x, err, sizeof err) == -1, "bad dtype rejected: %s",
              err);
    TAP_CHECK(lt_st_writer_add(w, "n", LT_ST_F32, 1, s2, NULL, err, sizeof err) == -1, "NULL data rejected: %s", err);
    TAP_CHECK(lt_st_writer_add(w, "", LT_ST_F32, 1, s2, x, err, sizeof err) == -1, "empty name rejected: %s", err);
    TAP_CHECK(lt_st_writer_add(w, "__metadata__", LT_ST_F32, 1, s2, x, err, sizeof err) == -1,
              "reserved name rejected: %s", err);
    TAP_CHECK(lt_st_writer_add(w, "bad\xff", LT_ST_F32, 1, s2, x, err, sizeof err) == -1, "invalid UTF-8 rejected: %s",
              err);
    TAP_CHECK(lt_st_writer_meta(w, LT_ST_CHECKSUM_KEY, "x", err, sizeof err) == -1, "reserved metadata key rejected: %s",
              err);
    lt_st_writer_add(w, "dup", LT_ST_F32, 1, s2, x, err, sizeof err);
    lt_st_writer_add(w, "dup", LT_ST_F32, 1, s2, x, err, sizeof err);
    const char *p = tpath("dup.safetensors");
    TAP_CHECK(lt_st_writer_write(w, p, err, sizeof err) == -1 && strstr(err, "duplicate tensor name 'dup'") &&
                  access(p, F_OK) != 0 && count_prefix("dup.safetensors") == 0,
              "duplicate names rejected before anything is written: %s", err);
    lt_st_writer_free(w);
    w = lt_st_writer_new();
    lt_st_writer_meta(w, "k", "1", err, sizeof err);
    lt_st_writer_meta(w, "k", "2", err, sizeof err);
    TAP_CHECK(lt_st_writer_write(w, p, err, sizeof err) == -1 && strstr(err, "duplicate metadata key 'k'"),
              "duplicate metadata keys rejected: %s", err);
    lt_st_writer_free(w);
}

/* ---------------------------------------------------------------- corruption */

/* Every truncation and every byte flip of a valid file must be rejected. */
static void test_truncate_and_flip(const char *src, const char *label) {
    size_t n;
    unsigned char *b = read_all(src, &n);
    const char *p = tpath("corrupt.safetensors");
    int bad_trunc = 0, bad_trunc_nv = 0;
    for (size_t len = 0; len < n; len++) {
        write_bytes(p, b, len);
        lt_st_file *f = lt_st_open(p, err, sizeof err);
        if (f || !strstr(err, p)) bad_trunc++;
        lt_st_close(f);
        f = lt_st_open_ex(p, LT_ST_NO_VERIFY, err, sizeof err);
        if (f) bad_trunc_nv++;
        lt_st_close(f);
    }
    TAP_CHECK(bad_trunc == 0, "%s: all %zu truncations rejected (%d accepted)", label, n, bad_trunc);
    TAP_CHECK(bad_trunc_nv == 0, "%s: truncations rejected even without checksum pass (%d accepted)", label,
              bad_trunc_nv);

    /* A flip inside the checksum key's own name makes the file look checksum-less, which
     * only REQUIRE_CHECKSUM can catch; every other flip is caught by default. */
    long kpos = find_bytes(b, n, "\"" LT_ST_CHECKSUM_KEY "\"");
    size_t klo = (size_t)kpos + 1, khi = klo + strlen(LT_ST_CHECKSUM_KEY);
    static const unsigned char masks[] = {0x01, 0x20, 0x80, 0xff};
    int bad_def = 0, bad_req = 0, total = 0;
    for (size_t i = 0; i < n; i++)
        for (size_t m = 0; m < sizeof masks; m++) {
            b[i] ^= masks[m];
            write_bytes(p, b, n);
            b[i] ^= masks[m];
            total++;
            lt_st_file *f = lt_st_open(p, err, sizeof err);
            if (f && !(i >= klo && i < khi)) {
                bad_def++;
                printf("# %s: flip 0x%02x at byte %zu accepted\n", label, masks[m], i);
            }
            lt_st_close(f);
            f = lt_st_open_ex(p, LT_ST_REQUIRE_CHECKSUM, err, sizeof err);
            if (f) bad_req++;
            lt_st_close(f);
        }
    TAP_CHECK(kpos > 0 && bad_def == 0, "%s: %d byte flips in header and data rejected by default", label, total);
    TAP_CHECK(bad_req == 0, "%s: all %d byte flips rejected with REQUIRE_CHECKSUM", label, total);

    /* Flips in the data section specifically produce a checksum error. */
    size_t hl = 0;
    for (int i = 0; i < 8; i++) hl |= (size_t)b[i] << (8 * i);
    if (8 + hl < n) {
        b[n - 1] ^= 0x10;
        write_bytes(p, b, n);
        b[n - 1] ^= 0x10;
        expect_fail(p, 0, "checksum mismatch", "flipped data byte");
    }
    free(b);
}

static void put_size(unsigned char *b, uint64_t v) {
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(v >> (8 * i));
}

static void test_header_size(void) {
    unsigned char b[64];
    memset(b, ' ', sizeof b);
    b[8] = '{';
    b[9] = '}';
    const char *p = tpath("hs.safetensors");
    write_bytes(p, b, 0);
    expect_fail(p, 0, "too short", "empty file");
    write_bytes(p, b, 7);
    expect_fail(p, 0, "too short", "7-byte file");
    put_size(b, UINT64_MAX);
    write_bytes(p, b, 16);
    expect_fail(p, 0, "exceeds", "header size 2^64-1");
    put_size(b, (uint64_t)1 << 62);
    write_bytes(p, b, 16);
    expect_fail(p, 0, "exceeds", "header size 2^62");
    put_size(b, 9);
    write_bytes(p, b, 16);
    expect_fail(p, 0, "exceeds", "header size one past the end");
    put_size(b, 0);
    write_bytes(p, b, 16);
    expect_fail(p, 0, "too small", "header size 0");
    put_size(b, 8);
    b[8] = '[';
    write_bytes(p, b, 16);
    expect_fail(p, 0, "start with '{'", "header starting with '['");
    b[8] = ' ';
    write_bytes(p, b, 16);
    expect_fail(p, 0, "start with '{'", "header starting with whitespace");

    /* Over the 100 MB header limit (sparse file: no disk space used). */
    put_size(b, (uint64_t)LT_ST_MAX_HEADER + 8);
    b[8] = '{';
    FILE *fp = fopen(p, "wb");
    fwrite(b, 1, 16, fp);
    fclose(fp);
    int trc = truncate(p, (off_t)LT_ST_MAX_HEADER + 16);
    TAP_CHECK(trc == 0, "sparse 100 MB file created");
    expect_fail(p, 0, "limit", "header over 100 MB");
    unlink(p);

    expect_fail(dir, 0, "not a regular file", "directory");
    expect_fail(tpath("does-not-exist"), 0, "cannot open", "missing file");
}

typedef struct {
    const char *what, *header, *want;
    size_t dlen;
} hcase;

static void test_bad_headers(void) {
    static unsigned char zeros[256];
    char deep[4096];
    strcpy(deep, "{\"a\":");
    for (int i = 0; i < 2000; i++) strcat(deep, "[");
    const char *T = "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]";
    char buf[40][512];
    int nb = 0;
#define H(...) (snprintf(buf[nb], sizeof buf[0], __VA_ARGS__), buf[nb++])
    const hcase cases[] = {
        /* malformed JSON */
        {"trailing comma", "{\"a\":{},}", "trailing comma", 0},
        {"missing colon", "{\"a\" {}}", "expected ':'", 0},
        {"unterminated string", "{\"a", "unterminated string", 0},
        {"unterminated object", "{\"a\":{}", "unterminated object", 0},
        {"bad escape", "{\"a\\q\":{}}", "bad escape", 0},
        {"bad \\u escape", "{\"a\\u12g4\":{}}", "bad \\u escape", 0},
        {"lone surrogate", "{\"a\\ud800\":{}}", "surrogate", 0},
        {"\\u0000 in key", "{\"a\\u0000\":{}}", "\\u0000", 0},
        {"raw control char", "{\"a\tb\":{}}", "control character", 0},
        {"invalid UTF-8", "{\"a\xff\":{}}", "UTF-8", 0},
        {"overlong UTF-8", "{\"a\xc0\xaf\":{}}", "UTF-8", 0},
        {"UTF-8 surrogate", "{\"a\xed\xa0\x80\":{}}", "UTF-8", 0},
        {"float", "{\"a\":1.5}", "non-integer", 0},
        {"exponent", "{\"a\":1e5}", "non-integer", 0},
        {"true", "{\"a\":true}", "unsupported JSON value", 0},
        {"null", "{\"a\":null}", "unsupported JSON value", 0},
        {"leading zero", "{\"a\":01}", "leading zero", 0},
        {"integer overflow", "{\"a\":18446744073709551616}", "too large", 0},
        {"garbage after root", "{}x", "after JSON value", 0},
        {"two roots", "{}{}", "after JSON value", 0},
        {"deep nesting", deep, "nesting too deep", 0},
        {"non-string key", "{1:{}}", "expected string key", 0},
        /* schema */
        {"tensor not an object", "{\"a\":[1]}", "not an object", 0},
        {"metadata not an object", "{\"__metadata__\":[]}", "__metadata__ is not an object", 0},
        {"metadata int value", "{\"__metadata__\":{\"k\":1}}", "not a string", 0},
        {"duplicate metadata", "{\"__metadata__\":{},\"__metadata__\":{}}", "duplicate __metadata__", 0},
        {"duplicate metadata key", "{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", "duplicate metadata key 'k'", 0},
        {"unknown dtype", H("{\"a\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}"), "unknown dtype 'F33'", 8},
        {"lowercase dtype", H("{\"a\":{\"dtype\":\"f32\",\"shape\":[2],\"data_offsets\":[0,8]}}"), "unknown dtype", 8},
        {"dtype not a string", H("{\"a\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}"), "dtype is not a string", 8},
        {"negative dim", H("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}"), "non-negative", 8},
        {"string dim", H("{\"a\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}"), "non-negative", 8},
        {"shape not array", H("{\"a\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}"), "shape is not an array", 8},
        {"rank 9", H("{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}"), "dimensions", 1},
        {"shape overflow", H("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}"),
         "overflows", 8},
        {"size mismatch", H("{\"decoder.layers.0.mlp.linear_fc1.weight\":{\"dtype\":\"F32\",\"shape\":[4,8],"
                            "\"data_offsets\":[0,100]}}"),
         "tensor 'decoder.layers.0.mlp.linear_fc1.weight': data_offsets [0, 100] do not match shape [4, 8] of F32 (128 "
         "bytes)",
         100},
        {"offsets length 1", H("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8]}}"), "[begin, end]", 8},
        {"offsets length 3", H("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,8]}}"), "[begin, end]", 8},
        {"negative offset", H("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}"), "non-negative", 8},
        {"end before begin", H("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}"), "end before", 8},
        {"past data section", H("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}"), "run past", 4},
        {"huge offsets", H("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[18446744073709551608,"
                           "18446744073709551615]}}"),
         "run past", 8},
        {"missing dtype", "{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", "missing dtype", 8},
        {"missing offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", "missing data_offsets", 8},
        {"unknown field", H("{\"a\":{%s,\"extra\":\"x\"}}", T), "unknown field 'extra'", 8},
        {"duplicate field", H("{\"a\":{%s,\"dtype\":\"F32\"}}", T), "duplicate field 'dtype'", 8},
        {"duplicate names", H("{\"a\":{%s},\"a\":{%s}}", T, T), "duplicate tensor name 'a'", 8},
        {"overlap", H("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}"),
         "overlap", 12},
        {"same range", H("{\"a\":{%s},\"b\":{%s}}", T, T), "overlap", 8},
        {"gap", H("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                  "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}"),
         "gap", 12},
        {"trailing bytes", H("{\"a\":{%s}}", T), "tensors cover 8", 12},
        {"checksum not hex", H("{\"__metadata__\":{\"luatron.checksum\":\"zzzzzzzzzzzzzzzz\"},\"a\":{%s}}", T),
         "malformed", 8},
        {"checksum uppercase", H("{\"__metadata__\":{\"luatron.checksum\":\"ABCDEF0123456789\"},\"a\":{%s}}", T),
         "malformed", 8},
        {"checksum short", H("{\"__metadata__\":{\"luatron.checksum\":\"abc\"},\"a\":{%s}}", T), "malformed", 8},
        {"checksum escaped", H("{\"__metadata__\":{\"luatron.checksum\":\"\\u0030bcdef0123456789\"},\"a\":{%s}}", T),
         "malformed", 8},
        {"checksum wrong", H("{\"__metadata__\":{\"luatron.checksum\":\"0123456789abcdef\"},\"a\":{%s}}", T),
         "checksum mismatch", 8},
    };
#undef H
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *p = make_file("bad.safetensors", cases[i].header, zeros, cases[i].dlen);
        expect_fail(p, 0, cases[i].want, cases[i].what);
    }
    /* Tensor names appear in messages, with the file name first. */
    const char *p = make_file("model.safetensors", "{\"a\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", zeros, 8);
    lt_st_open(p, err, sizeof err);
    TAP_CHECK(strncmp(err, p, strlen(p)) == 0 && strstr(err, ": tensor 'a': unknown dtype 'F33'"),
              "message format: %s", err);
}


/* Random multi-byte damage with the checksum pass off, so that the structural checks
 * alone face it: any outcome is fine except a crash or a tensor outside the file. */
static void test_fuzz(const char *src) {
    size_t n;
    unsigned char *orig = read_all(src, &n), *b = malloc(n);
    const char *p = tpath("fuzz.safetensors");
    uint64_t s = 0x9e3779b97f4a7c15ull;
    int opened = 0, escaped = 0;
    for (int it = 0; it < 1500; it++) {
        memcpy(b, orig, n);
        int k = 1 + it % 4;
        for (int j = 0; j < k; j++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            size_t pos = (size_t)(s >> 33) % n;
            b[pos] = (unsigned char)(s >> 20);
        }
        size_t len = it % 7 == 0 ? (size_t)(s >> 40) % (n + 1) : n;
        write_bytes(p, b, len);
        lt_st_file *f = lt_st_open_ex(p, LT_ST_NO_VERIFY, err, sizeof err);
        if (f) {
            opened++;
            size_t hl = 0;
            for (int i = 0; i < 8; i++) hl |= (size_t)b[i] << (8 * i);
            for (size_t i = 0; i < lt_st_count(f); i++) {
                const lt_st_tensor *t = lt_st_tensor_at(f, i);
                if (t->offset + t->nbytes > len - 8 - hl) escaped++;
            }
        }
        lt_st_close(f);
    }
    TAP_CHECK(escaped == 0, "fuzz: 1500 damaged files, %d still well-formed, no tensor outside the file", opened);
    free(orig);
    free(b);
}

static void test_err_buffers(void) {
    const char *p = tpath("missing.safetensors");
    TAP_CHECK(lt_st_open(p, NULL, 0) == NULL, "NULL err buffer is fine");
    char small[6] = "xxxxx";
    TAP_CHECK(lt_st_open(p, small, 4) == NULL && strlen(small) == 3, "short err buffer is truncated and terminated");
    TAP_CHECK(lt_st_count(NULL) == 0 && lt_st_find(NULL, "a") == NULL && lt_st_meta(NULL, "a") == NULL,
              "NULL handle queries are safe");
    lt_st_close(NULL);
    lt_st_writer_free(NULL);
}

static void cleanup(void) {
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (e->d_name[0] != '.') unlink(tpath(e->d_name));
    if (d) closedir(d);
    rmdir(dir);
}

int main(void) {
    const char *base = getenv("TEST_TMPDIR");
    snprintf(dir, sizeof dir, "%s/lt_st_XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(dir)) {
        printf("Bail out! cannot create temp dir %s\n", dir);
        return 1;
    }
    test_round_trip();
    test_exact_bytes();
    test_foreign();
    test_atomic();
    test_writer_errors();
    test_header_size();
    test_bad_headers();
    test_truncate_and_flip(tpath("exact.safetensors"), "tiny file");
    test_truncate_and_flip(tpath("rt.safetensors"), "round-trip file");
    test_fuzz(tpath("rt.safetensors"));
    test_err_buffers();
    cleanup();
    return tap_done();
}
