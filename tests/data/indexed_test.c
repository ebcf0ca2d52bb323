/* Indexed dataset: writer bytes against the MMIDIDX format, round trips for every integer
 * dtype, and the reader's validation of damaged files (each must fail cleanly). */
#define _XOPEN_SOURCE 700
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "engine/data/indexed.h"
#include "tests/data/tmpdir.h"
#include "tests/tap.h"

static char err[512];

static void put_u64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static void put_i64(unsigned char *p, int64_t v) { memcpy(p, &v, 8); }
static void put_i32(unsigned char *p, int32_t v) { memcpy(p, &v, 4); }

/* Two documents: [1 2 3] and [4 5], [] -> sequences {1,2,3}, {4,5}, {} (doc 2 holds 2 seqs). */
static int write_small(const char *prefix, int dtype) {
    lt_indexed_writer *w = lt_indexed_writer_open(prefix, dtype, err, sizeof err);
    if (!w) return -1;
    int32_t a[] = {1, 2, 3}, b[] = {4, 5};
    if (lt_indexed_writer_add(w, a, 3, err, sizeof err) || lt_indexed_writer_end_document(w, err, sizeof err) ||
        lt_indexed_writer_add(w, b, 2, err, sizeof err) || lt_indexed_writer_add(w, NULL, 0, err, sizeof err) ||
        lt_indexed_writer_end_document(w, err, sizeof err)) {
        lt_indexed_writer_abort(w);
        return -1;
    }
    return lt_indexed_writer_finalize(w, err, sizeof err);
}

static void test_known_bytes(void) {
    const char *p = tmp_path("known");
    TAP_CHECK(write_small(p, LT_DTYPE_UINT16) == 0, "writer finalizes a small dataset (%s)", err);
    size_t n = 0;
    char ip[4200], bp[4200];
    snprintf(ip, sizeof ip, "%s.idx", p);
    snprintf(bp, sizeof bp, "%s.bin", p);
    unsigned char *idx = read_file(ip, &n);
    /* Expected .idx, built field by field from the format. */
    unsigned char want[34 + 3 * 4 + 3 * 8 + 3 * 8];
    memcpy(want, "MMIDIDX\0\0", 9);
    put_u64(want + 9, 1);
    want[17] = 8; /* uint16 */
    put_u64(want + 18, 3);
    put_u64(want + 26, 3);
    put_i32(want + 34, 3); put_i32(want + 38, 2); put_i32(want + 42, 0);
    put_i64(want + 46, 0); put_i64(want + 54, 6); put_i64(want + 62, 10);
    put_i64(want + 70, 0); put_i64(want + 78, 1); put_i64(want + 86, 3);
    TAP_CHECK(idx && n == sizeof want, ".idx has %zu bytes (expected %zu)", n, sizeof want);
    TAP_CHECK(idx && memcmp(idx, "MMIDIDX\x00\x00", 9) == 0, ".idx header magic is MMIDIDX\\0\\0");
    TAP_CHECK(idx && n >= 34 && idx[9] == 1 && memcmp(idx + 10, "\0\0\0\0\0\0\0", 7) == 0,
              ".idx version is u64 little-endian 1");
    TAP_CHECK(idx && n >= 34 && idx[17] == 8, ".idx dtype code is 8 (uint16)");
    TAP_CHECK(idx && n >= 34 && idx[18] == 3 && idx[26] == 3, ".idx counts: 3 sequences, 3 document entries");
    TAP_CHECK(idx && n == sizeof want && memcmp(idx, want, n) == 0, ".idx bytes match the format exactly");
    free(idx);
    unsigned char *bin = read_file(bp, &n);
    const unsigned char wbin[] = {1, 0, 2, 0, 3, 0, 4, 0, 5, 0};
    TAP_CHECK(bin && n == sizeof wbin && memcmp(bin, wbin, n) == 0, ".bin holds the uint16 tokens back to back");
    free(bin);
    char tmpname[4300];
    snprintf(tmpname, sizeof tmpname, "%s.idx.tmp.%ld", p, (long)getpid());
    TAP_CHECK(!file_exists(tmpname), "no temporary file is left after finalize");

    lt_indexed *ds = lt_indexed_open(p, err, sizeof err);
    TAP_CHECK(ds != NULL, "reader opens the written dataset (%s)", ds ? "" : err);
    if (!ds) return;
    TAP_CHECK(lt_indexed_num_sequences(ds) == 3 && lt_indexed_num_documents(ds) == 2, "3 sequences, 2 documents");
    TAP_CHECK(lt_indexed_sequence_length(ds, 0) == 3 && lt_indexed_sequence_length(ds, 1) == 2 &&
                  lt_indexed_sequence_length(ds, 2) == 0 && lt_indexed_sequence_length(ds, 3) == -1,
              "sequence lengths 3, 2, 0");
    TAP_CHECK(lt_indexed_document_start(ds, 1) == 1 && lt_indexed_document_start(ds, 2) == 3,
              "document index [0, 1, 3]");
    int32_t out[3] = {0};
    TAP_CHECK(lt_indexed_read(ds, 0, 1, 2, out, err, sizeof err) == 0 && out[0] == 2 && out[1] == 3,
              "read tokens 1..2 of sequence 0");
    TAP_CHECK(lt_indexed_read(ds, 1, 1, 2, out, err, sizeof err) != 0, "reading past a sequence fails: %s", err);
    TAP_CHECK(lt_indexed_read(ds, 7, 0, 1, out, err, sizeof err) != 0, "reading a missing sequence fails: %s", err);
    TAP_CHECK(lt_indexed_num_tokens(ds) == 5 && !lt_indexed_multimodal(ds), "5 tokens, not multimodal");
    lt_indexed_close(ds);
}

static void test_dtypes(void) {
    TAP_CHECK(lt_indexed_optimal_dtype(257) == LT_DTYPE_UINT16 && lt_indexed_optimal_dtype(65499) == LT_DTYPE_UINT16 &&
                  lt_indexed_optimal_dtype(65500) == LT_DTYPE_INT32 && lt_indexed_optimal_dtype(128256) == LT_DTYPE_INT32,
              "optimal dtype: uint16 below 65500, else int32 (Megatron)");
    const int codes[] = {LT_DTYPE_UINT8, LT_DTYPE_INT8, LT_DTYPE_INT16, LT_DTYPE_INT32, LT_DTYPE_INT64, LT_DTYPE_UINT16};
    const int32_t maxv[] = {255, 127, 32767, 2147483647, 2147483647, 65535};
    for (int c = 0; c < 6; c++) {
        const char *p = tmp_path(lt_indexed_dtype_name(codes[c]));
        lt_indexed_writer *w = lt_indexed_writer_open(p, codes[c], err, sizeof err);
        int32_t toks[64];
        int ok = w != NULL;
        for (int d = 0; ok && d < 5; d++) {
            for (int k = 0; k < 10 + d; k++) toks[k] = (int32_t)((int64_t)(d * 31 + k * 7) % ((int64_t)maxv[c] + 1));
            toks[0] = maxv[c];
            ok = lt_indexed_writer_add(w, toks, 10 + d, err, sizeof err) == 0;
            if (ok && d % 2 == 1) ok = lt_indexed_writer_end_document(w, err, sizeof err) == 0;
        }
        int32_t bad = maxv[c] == 2147483647 ? -1 : maxv[c] + 1;
        if (ok) TAP_CHECK(lt_indexed_writer_add(w, &bad, 1, err, sizeof err) != 0,
                          "%s writer rejects id %d: %s", lt_indexed_dtype_name(codes[c]), bad, err);
        ok = ok && lt_indexed_writer_num_documents(w) == 2 && lt_indexed_writer_finalize(w, err, sizeof err) == 0;
        if (!ok && w) lt_indexed_writer_abort(w);
        lt_indexed *ds = ok ? lt_indexed_open(p, err, sizeof err) : NULL;
        int same = ds && lt_indexed_dtype(ds) == codes[c] && lt_indexed_num_sequences(ds) == 5 &&
                   lt_indexed_num_documents(ds) == 3; /* pending 5th sequence ended by finalize */
        for (int d = 0; same && d < 5; d++) {
            int32_t got[64];
            same = lt_indexed_read(ds, d, 0, 10 + d, got, err, sizeof err) == 0 && got[0] == maxv[c];
            for (int k = 1; same && k < 10 + d; k++)
                same = got[k] == (int32_t)((int64_t)(d * 31 + k * 7) % ((int64_t)maxv[c] + 1));
        }
        TAP_CHECK(same, "%s round trip (%s)", lt_indexed_dtype_name(codes[c]), same ? "ok" : err);
        lt_indexed_close(ds);
    }
    TAP_CHECK(lt_indexed_writer_open(tmp_path("f32"), LT_DTYPE_FLOAT32, err, sizeof err) == NULL,
              "writer refuses float dtypes: %s", err);

    /* Float tokens (Megatron allows the code): integral values read, others fail. */
    unsigned char idx[34 + 4 + 8 + 16];
    memcpy(idx, "MMIDIDX\0\0", 9);
    put_u64(idx + 9, 1);
    idx[17] = LT_DTYPE_FLOAT32;
    put_u64(idx + 18, 1); put_u64(idx + 26, 2);
    put_i32(idx + 34, 3); put_i64(idx + 38, 0); put_i64(idx + 46, 0); put_i64(idx + 54, 1);
    float fb[3] = {7.0f, 65536.0f, 2.5f};
    write_file(tmp_path("float.idx"), idx, sizeof idx);
    write_file(tmp_path("float.bin"), fb, sizeof fb);
    lt_indexed *ds = lt_indexed_open(tmp_path("float"), err, sizeof err);
    int32_t got[3];
    TAP_CHECK(ds && lt_indexed_read(ds, 0, 0, 2, got, err, sizeof err) == 0 && got[0] == 7 && got[1] == 65536,
              "float32 token ids convert to int32");
    TAP_CHECK(ds && lt_indexed_read(ds, 0, 0, 3, got, err, sizeof err) != 0 && strstr(err, "2.5"),
              "a non-integral float token fails: %s", err);
    lt_indexed_close(ds);
}

/* Writes a damaged copy of the small dataset and expects open to fail with `needle`. */
static unsigned char base_idx[4096], base_bin[4096];
static size_t base_idx_n, base_bin_n;

static void expect_fail(const char *what, const unsigned char *idx, size_t idx_n, const unsigned char *bin,
                        size_t bin_n, const char *needle) {
    static int k;
    char leaf[64];
    snprintf(leaf, sizeof leaf, "bad%d", k++);
    char ip[4200], bp[4200];
    snprintf(ip, sizeof ip, "%s.idx", tmp_path(leaf));
    snprintf(bp, sizeof bp, "%s.bin", tmp_path(leaf));
    if (idx) write_file(ip, idx, idx_n);
    if (bin) write_file(bp, bin, bin_n);
    err[0] = 0;
    lt_indexed *ds = lt_indexed_open(tmp_path(leaf), err, sizeof err);
    TAP_CHECK(ds == NULL && strstr(err, needle) != NULL, "%s is refused: %s", what, err);
    lt_indexed_close(ds);
}

static void test_validation(void) {
    const char *p = tmp_path("base");
    write_small(p, LT_DTYPE_UINT16);
    char path[4200];
    snprintf(path, sizeof path, "%s.idx", p);
    unsigned char *d = read_file(path, &base_idx_n);
    memcpy(base_idx, d, base_idx_n);
    free(d);
    snprintf(path, sizeof path, "%s.bin", p);
    d = read_file(path, &base_bin_n);
    memcpy(base_bin, d, base_bin_n);
    free(d);
    unsigned char idx[4096];
    size_t n = base_idx_n;

    expect_fail("a missing .idx", NULL, 0, base_bin, base_bin_n, "cannot open");
    expect_fail("a missing .bin", base_idx, n, NULL, 0, "cannot open");
    expect_fail("an .idx shorter than its header", base_idx, 20, base_bin, base_bin_n, "truncated");
    expect_fail("a truncated .idx", base_idx, n - 5, base_bin, base_bin_n, "truncated");
    expect_fail("a truncated .bin", base_idx, n, base_bin, base_bin_n - 2, "past the end");
    memcpy(idx, base_idx, n); idx[0] = 'X';
    expect_fail("bad magic", idx, n, base_bin, base_bin_n, "bad magic");
    memcpy(idx, base_idx, n); put_u64(idx + 9, 2);
    expect_fail("version 2", idx, n, base_bin, base_bin_n, "version 2");
    memcpy(idx, base_idx, n); idx[17] = 9;
    expect_fail("dtype code 9", idx, n, base_bin, base_bin_n, "dtype code 9");
    memcpy(idx, base_idx, n); idx[17] = 0;
    expect_fail("dtype code 0", idx, n, base_bin, base_bin_n, "dtype code 0");
    memcpy(idx, base_idx, n); put_u64(idx + 18, 1000);
    expect_fail("a sequence count beyond the file", idx, n, base_bin, base_bin_n,
                ".idx: truncated: header says 1000 sequences but file has room for 3");
    memcpy(idx, base_idx, n); put_u64(idx + 18, UINT64_MAX);
    expect_fail("a sequence count of 2^64-1", idx, n, base_bin, base_bin_n, "truncated");
    memcpy(idx, base_idx, n); put_u64(idx + 26, (uint64_t)1 << 62);
    expect_fail("a huge document count", idx, n, base_bin, base_bin_n, "document-index entries");
    memcpy(idx, base_idx, n); put_u64(idx + 26, 0);
    expect_fail("an empty document index", idx, n, base_bin, base_bin_n, "document index is empty");
    memcpy(idx, base_idx, n); put_i64(idx + 54, 8);
    expect_fail("a pointer past the end of .bin", idx, n, base_bin, base_bin_n, "past the end");
    memcpy(idx, base_idx, n); put_i64(idx + 54, INT64_MAX - 1);
    expect_fail("a pointer near 2^63", idx, n, base_bin, base_bin_n, "past the end");
    memcpy(idx, base_idx, n); put_i64(idx + 46, -4);
    expect_fail("a negative pointer", idx, n, base_bin, base_bin_n, "negative byte offset");
    memcpy(idx, base_idx, n); put_i32(idx + 38, -1);
    expect_fail("a negative length", idx, n, base_bin, base_bin_n, "negative length");
    memcpy(idx, base_idx, n); put_i32(idx + 38, 3);
    expect_fail("a length past the end of .bin", idx, n, base_bin, base_bin_n, "past the end");
    memcpy(idx, base_idx, n); put_i64(idx + 70, 1);
    expect_fail("a document index not starting at 0", idx, n, base_bin, base_bin_n, "starts at 1");
    memcpy(idx, base_idx, n); put_i64(idx + 86, 2);
    expect_fail("a document index ending short", idx, n, base_bin, base_bin_n, "ends at sequence 2");
    memcpy(idx, base_idx, n); put_i64(idx + 78, 3); put_i64(idx + 86, 2);
    expect_fail("a decreasing document index", idx, n, base_bin, base_bin_n, "decreases");
    memcpy(idx, base_idx, n); memcpy(idx + n, "zz", 2);
    expect_fail("trailing bytes", idx, n + 2, base_bin, base_bin_n, "unexpected bytes");

    /* Multimodal: one mode byte per sequence after the document index is accepted. */
    memcpy(idx, base_idx, n); memset(idx + n, 0, 3);
    write_file(tmp_path("mm.idx"), idx, n + 3);
    write_file(tmp_path("mm.bin"), base_bin, base_bin_n);
    lt_indexed *ds = lt_indexed_open(tmp_path("mm"), err, sizeof err);
    TAP_CHECK(ds && lt_indexed_multimodal(ds), "an .idx with sequence modes opens as multimodal");
    lt_indexed_close(ds);

    /* int64 tokens beyond int32 fail at read time, naming the token. */
    unsigned char i64idx[34 + 4 + 8 + 16];
    memcpy(i64idx, "MMIDIDX\0\0", 9);
    put_u64(i64idx + 9, 1);
    i64idx[17] = LT_DTYPE_INT64;
    put_u64(i64idx + 18, 1); put_u64(i64idx + 26, 2);
    put_i32(i64idx + 34, 2); put_i64(i64idx + 38, 0); put_i64(i64idx + 46, 0); put_i64(i64idx + 54, 1);
    int64_t big[2] = {5, (int64_t)1 << 40};
    write_file(tmp_path("big.idx"), i64idx, sizeof i64idx);
    write_file(tmp_path("big.bin"), big, sizeof big);
    ds = lt_indexed_open(tmp_path("big"), err, sizeof err);
    int32_t got[2];
    TAP_CHECK(ds && lt_indexed_read(ds, 0, 0, 2, got, err, sizeof err) != 0 && strstr(err, "token 1"),
              "an int64 id beyond int32 fails: %s", err);
    lt_indexed_close(ds);
}

static void test_empty_and_abort(void) {
    lt_indexed_writer *w = lt_indexed_writer_open(tmp_path("empty"), LT_DTYPE_UINT16, err, sizeof err);
    TAP_CHECK(w && lt_indexed_writer_finalize(w, err, sizeof err) == 0, "an empty dataset finalizes");
    lt_indexed *ds = lt_indexed_open(tmp_path("empty"), err, sizeof err);
    TAP_CHECK(ds && lt_indexed_num_sequences(ds) == 0 && lt_indexed_num_documents(ds) == 0,
              "an empty dataset opens with 0 sequences (%s)", ds ? "" : err);
    lt_indexed_close(ds);

    w = lt_indexed_writer_open(tmp_path("aborted"), LT_DTYPE_UINT16, err, sizeof err);
    int32_t t[2] = {1, 2};
    lt_indexed_writer_add(w, t, 2, err, sizeof err);
    lt_indexed_writer_abort(w);
    char tmpname[4300];
    snprintf(tmpname, sizeof tmpname, "%s.bin.tmp.%ld", tmp_path("aborted"), (long)getpid());
    TAP_CHECK(!file_exists(tmpname) && !file_exists(tmp_path("aborted.bin")) &&
                  !file_exists(tmp_path("aborted.idx")),
              "abort leaves no files");
    TAP_CHECK(lt_indexed_writer_open(tmp_path("no/such/dir/x"), LT_DTYPE_UINT16, err, sizeof err) == NULL,
              "writer into a missing directory fails: %s", err);
}

int main(void) {
    tmpdir_make("indexed_test");
    test_known_bytes();
    test_dtypes();
    test_validation();
    test_empty_and_abort();
    tmpdir_remove();
    return tap_done();
}
