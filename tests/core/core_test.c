/* engine/core: the caching allocator, tensors and views, the counter-based RNG. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "engine/core/alloc.h"
#include "engine/core/rng.h"
#include "engine/core/tensor.h"
#include "tests/tap.h"

static void test_allocator(void) {
    lt_alloc_stats s0 = lt_alloc_get_stats();
    void *a = lt_alloc(1000);
    TAP_CHECK(a != NULL && ((uintptr_t)a % 64) == 0, "allocations are 64-byte aligned");
    lt_alloc_stats s1 = lt_alloc_get_stats();
    TAP_CHECK(s1.in_use >= s0.in_use + 1000, "in_use grows by at least the request");
    TAP_CHECK(s1.peak_in_use >= s1.in_use, "peak covers in_use");
    lt_release(a, 1000);
    lt_alloc_stats s2 = lt_alloc_get_stats();
    TAP_CHECK(s2.in_use == s0.in_use, "release gives the bytes back");
    TAP_CHECK(s2.cached >= 1000, "a released block is cached");
    void *b = lt_alloc(1000);
    lt_alloc_stats s3 = lt_alloc_get_stats();
    TAP_CHECK(b == a && s3.num_allocs == s2.num_allocs, "same size again reuses the cached block, no malloc");
    lt_release(b, 1000);

    /* Many sizes at once: no block handed out twice, all released. */
    enum { K = 200 };
    void *blocks[K];
    size_t sizes[K];
    int distinct = 1;
    for (int i = 0; i < K; i++) {
        sizes[i] = (size_t)(i * 997 % 5000 + 1) * (i % 3 ? 1 : 1024);
        blocks[i] = lt_alloc(sizes[i]);
        memset(blocks[i], i & 0xff, sizes[i]);
    }
    for (int i = 0; i < K; i++)
        for (int j = i + 1; j < K; j++)
            if (blocks[i] == blocks[j]) distinct = 0;
    int intact = 1;
    for (int i = 0; i < K; i++)
        for (size_t k = 0; k < sizes[i]; k += 97)
            if (((unsigned char *)blocks[i])[k] != (i & 0xff)) intact = 0;
    TAP_CHECK(distinct, "live blocks are distinct");
    TAP_CHECK(intact, "live blocks do not overlap (contents intact)");
    for (int i = 0; i < K; i++) lt_release(blocks[i], sizes[i]);
    TAP_CHECK(lt_alloc_get_stats().in_use == s0.in_use, "everything released");
    lt_alloc_reset_peak();
    TAP_CHECK(lt_alloc_get_stats().peak_in_use == s0.in_use, "reset_peak brings the peak to in_use");
    lt_alloc_empty_cache();
    TAP_CHECK(lt_alloc_get_stats().cached == 0, "empty_cache frees the cache");
}

static void test_tensors(void) {
    int64_t shape[3] = {2, 3, 4};
    lt_tensor *t = lt_tensor_new(LT_F32, 3, shape);
    TAP_CHECK(t && lt_tensor_numel(t) == 24 && lt_tensor_is_contiguous(t), "new tensor: 24 contiguous elements");
    TAP_CHECK(t->stride[0] == 12 && t->stride[1] == 4 && t->stride[2] == 1, "row-major strides");
    float *d = lt_tensor_data(t);
    int zero = 1;
    for (int i = 0; i < 24; i++) zero &= d[i] == 0.0f;
    TAP_CHECK(zero, "new tensors are zero-filled");
    for (int i = 0; i < 24; i++) d[i] = (float)i;

    lt_tensor *n = lt_tensor_narrow(t, 1, 1, 2); /* [2, 2, 4] starting at row 1 */
    TAP_CHECK(n && n->shape[1] == 2 && !lt_tensor_is_contiguous(n), "narrow makes a strided view");
    TAP_CHECK(lt_tensor_get_flat(n, 0) == 4.0 && lt_tensor_get_flat(n, 8) == 16.0, "narrow view reads the right elements");
    lt_tensor_set_flat(n, 0, 100.0);
    TAP_CHECK(d[4] == 100.0f, "writes through a view reach the storage");
    TAP_CHECK(lt_tensor_narrow(t, 1, 2, 2) == NULL, "narrow past the end is refused");
    TAP_CHECK(lt_tensor_narrow(t, 3, 0, 1) == NULL, "narrow of a missing dimension is refused");

    lt_tensor *c = lt_tensor_clone(n);
    TAP_CHECK(c && lt_tensor_is_contiguous(c) && ((float *)lt_tensor_data(c))[0] == 100.0f &&
                  ((float *)lt_tensor_data(c))[8] == 16.0f,
              "clone of a view is a contiguous copy");
    ((float *)lt_tensor_data(c))[0] = -1.0f;
    TAP_CHECK(d[4] == 100.0f, "clone is independent");

    int64_t flat[1] = {24}, wrong[1] = {25}, two[2] = {6, 4};
    lt_tensor *r = lt_tensor_reshape(t, 2, two);
    TAP_CHECK(r && r->shape[0] == 6 && lt_tensor_data(r) == lt_tensor_data(t), "reshape shares storage");
    TAP_CHECK(lt_tensor_reshape(t, 1, wrong) == NULL, "reshape to another element count is refused");
    TAP_CHECK(lt_tensor_reshape(n, 1, flat) == NULL, "reshape of a strided view is refused");

    /* Views keep storage alive after the base is freed. */
    lt_tensor_free(t);
    TAP_CHECK(lt_tensor_get_flat(r, 23) == 23.0, "a view outlives its base tensor");
    lt_tensor_free(r);
    lt_tensor_free(n);
    lt_tensor_free(c);

    int64_t bad[1] = {-1};
    TAP_CHECK(lt_tensor_new(LT_F32, 1, bad) == NULL, "negative dimension refused");
    TAP_CHECK(lt_tensor_new(LT_F32, LT_MAX_DIMS + 1, shape) == NULL, "too many dimensions refused");

    int64_t s1[1] = {4};
    lt_tensor *i64 = lt_tensor_new(LT_I64, 1, s1), *bf = lt_tensor_new(LT_BF16, 1, s1);
    lt_tensor_set_flat(i64, 3, 9007199254740993.0);
    TAP_CHECK(((int64_t *)lt_tensor_data(i64))[3] == 9007199254740992LL, "int64 elements");
    lt_tensor_set_flat(bf, 0, 1.5);
    lt_tensor_set_flat(bf, 1, 3.14159265);
    TAP_CHECK(lt_tensor_get_flat(bf, 0) == 1.5 && fabs(lt_tensor_get_flat(bf, 1) - 3.140625) < 1e-9,
              "bf16 rounds to nearest (pi -> 3.140625)");
    TAP_CHECK(lt_dtype_size(LT_BF16) == 2 && lt_dtype_parse("bfloat16") == LT_BF16 && lt_dtype_parse("f16") == -1,
              "dtype sizes and names");
    lt_tensor_free(i64);
    lt_tensor_free(bf);

    /* gather: strided views of every element size into contiguous tensors, as get_flat reads them (a
     * 3-D view with its last two dimensions swapped and narrowed, larger than one 32 x 32 tile; a 1-D
     * strided row) */
    const lt_dtype types[3] = {LT_F32, LT_BF16, LT_I64};
    for (int k = 0; k < 3; k++) {
        int64_t big[3] = {3, 70, 45};
        lt_tensor *b = lt_tensor_new(types[k], 3, big);
        for (int64_t i = 0; i < lt_tensor_numel(b); i++) lt_tensor_set_flat(b, i, (double)(i % 251));
        const int64_t vshape[3] = {3, 40, 66}, vstride[3] = {b->stride[0], 1, b->stride[1]};
        lt_tensor *v = lt_tensor_view(b, 3, vshape, vstride, 2 * b->stride[1] + 3); /* [3, 40 of 45, 66 of 70]^T */
        lt_tensor *g = lt_tensor_new(types[k], 3, vshape);
        lt_tensor_gather(g, v);
        int same = 1;
        for (int64_t i = 0; i < lt_tensor_numel(v); i++) same &= lt_tensor_get_flat(g, i) == lt_tensor_get_flat(v, i);
        const int64_t rshape[1] = {35}, rstride[1] = {2};
        lt_tensor *row = lt_tensor_view(b, 1, rshape, rstride, 1), *rg = lt_tensor_new(types[k], 1, rshape);
        lt_tensor_gather(rg, row);
        for (int64_t i = 0; i < 35; i++) same &= lt_tensor_get_flat(rg, i) == lt_tensor_get_flat(row, i);
        TAP_CHECK(same, "gather of transposed, narrowed and strided %s views equals their elements",
                  lt_dtype_name(types[k]));
        lt_tensor_free(b), lt_tensor_free(v), lt_tensor_free(g), lt_tensor_free(row), lt_tensor_free(rg);
    }
}

static void test_rng(void) {
    /* Philox4x32-10 known-answer test (Random123's kat_vectors: counter 0, key 0). */
    lt_philox_out z = lt_philox(0, 0);
    TAP_CHECK(z.v[0] == 0x6627e8d5u && z.v[1] == 0xe169c58du && z.v[2] == 0xbc57ac4cu && z.v[3] == 0x9b00dbd8u,
              "Philox4x32-10 matches the reference vector for key 0, counter 0 (%08x %08x %08x %08x)", z.v[0],
              z.v[1], z.v[2], z.v[3]);
    uint64_t k = lt_rng_key(1234, "decoder.layers.0.mlp.linear_fc1.weight");
    TAP_CHECK(k == lt_rng_key(1234, "decoder.layers.0.mlp.linear_fc1.weight"), "keys are stable");
    TAP_CHECK(k != lt_rng_key(1235, "decoder.layers.0.mlp.linear_fc1.weight") &&
                  k != lt_rng_key(1234, "decoder.layers.1.mlp.linear_fc1.weight"),
              "keys differ by seed and by name");

    enum { N = 200000 };
    static float a[N], b[N / 2];
    lt_rng_fill_normal(a, N, k, 0, 0.0f, 1.0f);
    lt_rng_fill_normal(b, N / 2, k, N / 2, 0.0f, 1.0f);
    TAP_CHECK(memcmp(a + N / 2, b, sizeof b) == 0, "element i depends only on (key, i): a shard reproduces its slice");
    double mean = 0, var = 0;
    for (int i = 0; i < N; i++) mean += a[i];
    mean /= N;
    for (int i = 0; i < N; i++) var += (a[i] - mean) * (a[i] - mean);
    var /= N;
    TAP_CHECK(fabs(mean) < 0.01 && fabs(var - 1.0) < 0.02, "normal: mean %.4f, variance %.4f", mean, var);
    double u = 0;
    int in_range = 1;
    for (int i = 0; i < N; i++) {
        float x = lt_rng_uniform(k, (uint64_t)i);
        in_range &= x >= 0.0f && x < 1.0f;
        u += x;
    }
    TAP_CHECK(in_range && fabs(u / N - 0.5) < 0.005, "uniform in [0, 1), mean %.4f", u / N);
}

int main(void) {
    test_allocator();
    test_tensors();
    test_rng();
    return tap_done();
}
