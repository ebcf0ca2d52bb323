/* A fresh scratch directory for a data test: under $TEST_TMPDIR (bazel) or /tmp. */
#ifndef LT_TESTS_DATA_TMPDIR_H
#define LT_TESTS_DATA_TMPDIR_H
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmp_root[4096];

static const char *tmpdir_make(const char *name) {
    const char *base = getenv("TEST_TMPDIR");
    snprintf(tmp_root, sizeof tmp_root, "%s/%s.XXXXXX", base && *base ? base : "/tmp", name);
    if (!mkdtemp(tmp_root)) {
        perror("mkdtemp");
        exit(1);
    }
    return tmp_root;
}

/* dir/leaf into a static buffer (one of 8 in rotation). */
static __attribute__((unused)) const char *tmp_path(const char *leaf) {
    static char bufs[8][4200];
    static int k;
    char *b = bufs[k++ & 7];
    snprintf(b, sizeof bufs[0], "%s/%s", tmp_root, leaf);
    return b;
}

/* Removes the (flat) scratch directory; call before tap_done. */
static __attribute__((unused)) void tmpdir_remove(void) {
    DIR *d = opendir(tmp_root);
    if (!d) return;
    struct dirent *e;
    char path[8400];
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(path, sizeof path, "%s/%s", tmp_root, e->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(tmp_root);
}

static __attribute__((unused)) int write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(data, 1, n, f);
    return fclose(f) == 0 && w == n ? 0 : -1;
}

/* Whole file into a malloc'd buffer; NULL if unreadable. */
static __attribute__((unused)) unsigned char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *d = malloc(sz > 0 ? (size_t)sz : 1);
    *n = d ? fread(d, 1, (size_t)sz, f) : 0;
    fclose(f);
    return d;
}

static __attribute__((unused)) int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}
#endif
