/* Bootstrap of a job's ranks: `luatron launch`'s environment, else PMIx, else one rank
 * (see bootstrap.h). */
#define _GNU_SOURCE /* environ, getrandom */
#include "engine/core/error.h"
#include "engine/comm/bootstrap.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pmix.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_TIMEOUT_S 300.0
#define JOB_ID_KEY "luatron.job_id"
#define MAX_KEY 64

extern char **environ;

static int bootstrapped;             /* lt_bootstrap succeeded once: `world` is kept */
static lt_comm_world_info world;
static const char *launcher = "none";
static int pmix_up;                  /* PMIx_Init succeeded and PMIx_Finalize has not run */
static int pmix_atexit;              /* lt_bootstrap_finalize registered with atexit */
static pmix_proc_t me;               /* this process under PMIx */
static unsigned exchange_seq;        /* counts exchanges: the n in their names */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A whole decimal integer in [lo, hi] from environment variable `name` (value s). */
static int parse_int(const char *name, const char *s, long lo, long hi, int *out, char *err, size_t errlen) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (s[0] == '\0' || *end != '\0' || errno || v < lo || v > hi)
        return lt_fail(err, errlen, "%s=%s is not an integer in [%ld, %ld]", name, s, lo, hi);
    *out = (int)v;
    return 0;
}

static int valid_name(const char *s, size_t max) {
    size_t n = strlen(s);
    if (n == 0 || n > max) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
              c == '.'))
            return 0;
    }
    return 1;
}

static uint32_t random32(void) {
    uint32_t r;
    if (getrandom(&r, sizeof r, GRND_NONBLOCK) == (ssize_t)sizeof r) return r;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint32_t)ts.tv_nsec ^ ((uint32_t)getpid() << 16);
}

/* A job id nobody else has: pid, time and randomness (hex, fits the 64 bytes of job_id). */
static void fresh_job_id(char *buf, size_t n, const char *prefix) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(buf, n, "%s%x-%llx-%08x", prefix, (unsigned)getpid(),
             (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000u, random32());
}

static int read_timeout(double *out, char *err, size_t errlen) {
    const char *s = getenv("LUATRON_COMM_TIMEOUT");
    *out = DEFAULT_TIMEOUT_S;
    if (!s || !*s) return 0;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (*end != '\0' || errno || !(v > 0) || !isfinite(v))
        return lt_fail(err, errlen, "LUATRON_COMM_TIMEOUT=%s is not a positive number of seconds", s);
    *out = v;
    return 0;
}

/* ------------------------------------------------------------ luatron launch */

static int from_launch_env(lt_comm_world_info *w, char *err, size_t errlen) {
    const char *rank = getenv("LUATRON_RANK"), *size = getenv("LUATRON_WORLD_SIZE");
    const char *lrank = getenv("LUATRON_LOCAL_RANK"), *lsize = getenv("LUATRON_LOCAL_WORLD_SIZE");
    const char *job = getenv("LUATRON_JOB_ID");
    if (!size || !*size) return lt_fail(err, errlen, "LUATRON_RANK is set but LUATRON_WORLD_SIZE is not");
    if (parse_int("LUATRON_WORLD_SIZE", size, 1, INT_MAX, &w->world_size, err, errlen)) return -1;
    if (parse_int("LUATRON_RANK", rank, 0, w->world_size - 1, &w->rank, err, errlen)) return -1;
    if (lsize && *lsize) {
        if (parse_int("LUATRON_LOCAL_WORLD_SIZE", lsize, 1, w->world_size, &w->local_size, err, errlen)) return -1;
    } else {
        w->local_size = w->world_size;
    }
    if (lrank && *lrank) {
        if (parse_int("LUATRON_LOCAL_RANK", lrank, 0, w->local_size - 1, &w->local_rank, err, errlen)) return -1;
    } else if (w->local_size == w->world_size) {
        w->local_rank = w->rank;
    } else {
        return lt_fail(err, errlen, "LUATRON_LOCAL_WORLD_SIZE is set but LUATRON_LOCAL_RANK is not");
    }
    if (job && *job) {
        if (!valid_name(job, sizeof w->job_id - 1))
            return lt_fail(err, errlen, "LUATRON_JOB_ID=%s: want 1 to %d characters of A-Z a-z 0-9 _ . -", job,
                        (int)sizeof w->job_id - 1);
        snprintf(w->job_id, sizeof w->job_id, "%s", job);
    } else if (w->world_size == 1) {
        fresh_job_id(w->job_id, sizeof w->job_id, "");
    } else {
        return lt_fail(err, errlen, "LUATRON_RANK is set but LUATRON_JOB_ID is not (every rank needs the same one)");
    }
    return 0;
}

/* ---------------------------------------------------------------- PMIx */

static int pmix_env_present(void) {
    if (getenv("PMIX_RANK") || getenv("PMIX_NAMESPACE")) return 1;
    for (char **e = environ; e && *e; e++)
        if (strncmp(*e, "PMIX_SERVER_URI", 15) == 0) return 1;
    return 0;
}

/* A PMIx value of any integer type as a long; -1 if it is not one. */
static long pmix_number(const pmix_value_t *v) {
    switch (v->type) {
    case PMIX_UINT8: return v->data.uint8;
    case PMIX_UINT16: return v->data.uint16;
    case PMIX_UINT32: return (long)v->data.uint32;
    case PMIX_UINT64: return (long)v->data.uint64;
    case PMIX_INT8: return v->data.int8;
    case PMIX_INT16: return v->data.int16;
    case PMIX_INT32: return v->data.int32;
    case PMIX_INT64: return (long)v->data.int64;
    case PMIX_INT: return v->data.integer;
    case PMIX_UINT: return (long)v->data.uint;
    case PMIX_SIZE: return (long)v->data.size;
    default: return -1;
    }
}

static int pmix_get_number(const pmix_proc_t *proc, const char *key, long *out, char *err, size_t errlen) {
    pmix_value_t *v = NULL;
    pmix_status_t rc = PMIx_Get(proc, key, NULL, 0, &v);
    if (rc != PMIX_SUCCESS || !v)
        return lt_fail(err, errlen, "PMIx_Get(%s) failed: %s", key, PMIx_Error_string(rc));
    *out = pmix_number(v);
    int type = v->type;
    PMIX_VALUE_RELEASE(v);
    if (*out < 0) return lt_fail(err, errlen, "PMIx_Get(%s): not a number (PMIx type %d)", key, type);
    return 0;
}

/* PMIx_Fence over the whole namespace, collecting the data put so far, waiting at most timeout_s. */
static int pmix_fence(double timeout_s, const char *what, char *err, size_t errlen) {
    pmix_info_t info[2];
    bool collect = true;
    int timeout = (int)ceil(timeout_s);
    PMIX_INFO_CONSTRUCT(&info[0]);
    PMIX_INFO_CONSTRUCT(&info[1]);
    PMIX_INFO_LOAD(&info[0], PMIX_COLLECT_DATA, &collect, PMIX_BOOL);
    PMIX_INFO_LOAD(&info[1], PMIX_TIMEOUT, &timeout, PMIX_INT);
    pmix_status_t rc = PMIx_Fence(NULL, 0, info, 2);
    PMIX_INFO_DESTRUCT(&info[0]);
    PMIX_INFO_DESTRUCT(&info[1]);
    if (rc != PMIX_SUCCESS)
        return lt_fail(err, errlen, "PMIx_Fence (%s) failed: %s%s", what, PMIx_Error_string(rc),
                    rc == PMIX_ERR_TIMEOUT ? " (a rank did not arrive within LUATRON_COMM_TIMEOUT)" : "");
    return 0;
}

/* 1: no PMIx launcher here (fall through); 0: filled; -1: error. */
static int from_pmix(lt_comm_world_info *w, char *err, size_t errlen) {
    if (!pmix_env_present()) return 1;
    pmix_status_t rc = PMIx_Init(&me, NULL, 0);
    if (rc == PMIX_ERR_UNREACH) return 1; /* "UNREACHABLE": no PMIx server behind us */
    if (rc != PMIX_SUCCESS) return lt_fail(err, errlen, "PMIx_Init failed: %s", PMIx_Error_string(rc));
    pmix_up = 1;
    if (!pmix_atexit && atexit(lt_bootstrap_finalize) == 0) pmix_atexit = 1;

    pmix_proc_t job;
    PMIX_PROC_CONSTRUCT(&job);
    PMIX_LOAD_PROCID(&job, me.nspace, PMIX_RANK_WILDCARD);
    long size, lrank, lsize;
    if (pmix_get_number(&job, PMIX_JOB_SIZE, &size, err, errlen) ||
        pmix_get_number(&me, PMIX_LOCAL_RANK, &lrank, err, errlen) ||
        pmix_get_number(&job, PMIX_LOCAL_SIZE, &lsize, err, errlen))
        goto fail;
    if (size < 1 || size > INT_MAX || me.rank >= (pmix_rank_t)size || lsize < 1 || lsize > size || lrank >= lsize) {
        lt_fail(err, errlen, "PMIx gave rank %u of %ld, local rank %ld of %ld", (unsigned)me.rank, size, lrank, lsize);
        goto fail;
    }
    w->rank = (int)me.rank;
    w->world_size = (int)size;
    w->local_rank = (int)lrank;
    w->local_size = (int)lsize;

    /* Rank 0 names the job (namespace + time), everyone takes its name. */
    if (me.rank == 0) {
        char ns[33], id[sizeof w->job_id];
        size_t k = 0;
        for (const char *p = me.nspace; *p && k < sizeof ns - 1; p++)
            ns[k++] = (char)((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ? *p : '_');
        ns[k] = '\0';
        char prefix[40];
        snprintf(prefix, sizeof prefix, "px%s-", ns);
        fresh_job_id(id, sizeof id, prefix);
        pmix_value_t v;
        PMIX_VALUE_CONSTRUCT(&v);
        v.type = PMIX_STRING;
        v.data.string = id;
        rc = PMIx_Put(PMIX_GLOBAL, JOB_ID_KEY, &v); /* copies the value */
        if (rc != PMIX_SUCCESS) {
            lt_fail(err, errlen, "PMIx_Put(%s) failed: %s", JOB_ID_KEY, PMIx_Error_string(rc));
            goto fail;
        }
    }
    rc = PMIx_Commit();
    if (rc != PMIX_SUCCESS) {
        lt_fail(err, errlen, "PMIx_Commit failed: %s", PMIx_Error_string(rc));
        goto fail;
    }
    if (pmix_fence(w->timeout_s, "job id", err, errlen)) goto fail;
    pmix_proc_t root;
    PMIX_PROC_CONSTRUCT(&root);
    PMIX_LOAD_PROCID(&root, me.nspace, 0);
    pmix_value_t *v = NULL;
    rc = PMIx_Get(&root, JOB_ID_KEY, NULL, 0, &v);
    if (rc != PMIX_SUCCESS || !v || v->type != PMIX_STRING || !v->data.string ||
        !valid_name(v->data.string, sizeof w->job_id - 1)) {
        lt_fail(err, errlen, "PMIx_Get(%s) from rank 0 failed: %s", JOB_ID_KEY,
             rc != PMIX_SUCCESS ? PMIx_Error_string(rc) : "not a job id");
        if (v) PMIX_VALUE_RELEASE(v);
        goto fail;
    }
    snprintf(w->job_id, sizeof w->job_id, "%s", v->data.string);
    PMIX_VALUE_RELEASE(v);
    return 0;
fail:
    lt_bootstrap_finalize();
    return -1;
}

/* ----------------------------------------------------------------- API */

int lt_bootstrap(lt_comm_world_info *info, char *err, size_t errlen) {
    if (bootstrapped) {
        *info = world;
        return 0;
    }
    lt_comm_world_info w;
    memset(&w, 0, sizeof w);
    if (read_timeout(&w.timeout_s, err, errlen)) return -1;
    const char *rank = getenv("LUATRON_RANK");
    const char *how;
    if (rank && *rank) {
        if (from_launch_env(&w, err, errlen)) return -1;
        how = "local";
    } else {
        int r = from_pmix(&w, err, errlen);
        if (r < 0) return -1;
        if (r == 0) {
            how = "pmix";
        } else {
            w.rank = 0;
            w.world_size = 1;
            w.local_rank = 0;
            w.local_size = 1;
            fresh_job_id(w.job_id, sizeof w.job_id, "");
            how = "none";
        }
    }
    world = w;
    launcher = how;
    bootstrapped = 1;
    *info = w;
    return 0;
}

const char *lt_bootstrap_launcher(void) { return launcher; }

void lt_bootstrap_finalize(void) {
    if (!pmix_up) return;
    pmix_up = 0;
    PMIx_Finalize(NULL, 0);
}

/* Where the local launcher's exchange files live: /dev/shm, else $TMPDIR, else /tmp. */
static const char *exchange_dir(void) {
    struct stat st;
    if (stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) && access("/dev/shm", W_OK | X_OK) == 0) return "/dev/shm";
    const char *t = getenv("TMPDIR");
    return t && *t ? t : "/tmp";
}

static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t k = write(fd, p, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int exchange_file(const char *key, const void *value, size_t len, int root, void *out, size_t outlen,
                         unsigned seq, char *err, size_t errlen) {
    char path[PATH_MAX], tmp[PATH_MAX + 8];
    snprintf(path, sizeof path, "%s/luatron-%s-bx%u-%s", exchange_dir(), world.job_id, seq, key);
    if (world.rank == root) {
        snprintf(tmp, sizeof tmp, "%s.tmp", path);
        int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0) return lt_fail(err, errlen, "bootstrap exchange '%s': cannot create %s: %s", key, tmp, strerror(errno));
        int bad = write_all(fd, value, len);
        int e = errno;
        if (close(fd) != 0 && !bad) {
            bad = 1;
            e = errno;
        }
        if (bad || rename(tmp, path) != 0) {
            if (!bad) e = errno;
            unlink(tmp);
            return lt_fail(err, errlen, "bootstrap exchange '%s': cannot write %s: %s", key, path, strerror(e));
        }
        memmove(out, value, len);
        return 0;
    }
    double deadline = now_s() + world.timeout_s;
    long sleep_ns = 1000000;
    for (;;) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            struct stat st;
            if (fstat(fd, &st) != 0) {
                int e = errno;
                close(fd);
                return lt_fail(err, errlen, "bootstrap exchange '%s': cannot stat %s: %s", key, path, strerror(e));
            }
            if ((size_t)st.st_size != outlen) {
                close(fd);
                return lt_fail(err, errlen, "bootstrap exchange '%s': rank %d published %lld bytes, this rank expects %zu",
                            key, root, (long long)st.st_size, outlen);
            }
            size_t got = 0;
            while (got < outlen) {
                ssize_t k = read(fd, (char *)out + got, outlen - got);
                if (k < 0 && errno == EINTR) continue;
                if (k <= 0) break;
                got += (size_t)k;
            }
            close(fd);
            if (got != outlen) return lt_fail(err, errlen, "bootstrap exchange '%s': short read of %s", key, path);
            return 0;
        }
        if (errno != ENOENT) return lt_fail(err, errlen, "bootstrap exchange '%s': cannot open %s: %s", key, path, strerror(errno));
        if (now_s() > deadline)
            return lt_fail(err, errlen, "bootstrap exchange '%s': rank %d did not publish within %g s (LUATRON_COMM_TIMEOUT)",
                        key, root, world.timeout_s);
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < 20000000) sleep_ns *= 2;
    }
}

static int exchange_pmix(const char *key, const void *value, size_t len, int root, void *out, size_t outlen,
                         unsigned seq, char *err, size_t errlen) {
    char pkey[MAX_KEY + 32];
    snprintf(pkey, sizeof pkey, "luatron.x%u.%s", seq, key);
    pmix_status_t rc;
    if (world.rank == root) {
        pmix_value_t v;
        PMIX_VALUE_CONSTRUCT(&v);
        v.type = PMIX_BYTE_OBJECT;
        v.data.bo.bytes = (char *)value;
        v.data.bo.size = len;
        rc = PMIx_Put(PMIX_GLOBAL, pkey, &v); /* copies the bytes */
        if (rc != PMIX_SUCCESS) return lt_fail(err, errlen, "bootstrap exchange '%s': PMIx_Put failed: %s", key, PMIx_Error_string(rc));
    }
    rc = PMIx_Commit();
    if (rc != PMIX_SUCCESS) return lt_fail(err, errlen, "bootstrap exchange '%s': PMIx_Commit failed: %s", key, PMIx_Error_string(rc));
    if (pmix_fence(world.timeout_s, key, err, errlen)) return -1;
    pmix_proc_t r;
    PMIX_PROC_CONSTRUCT(&r);
    PMIX_LOAD_PROCID(&r, me.nspace, (pmix_rank_t)root);
    pmix_value_t *v = NULL;
    rc = PMIx_Get(&r, pkey, NULL, 0, &v);
    if (rc != PMIX_SUCCESS || !v) return lt_fail(err, errlen, "bootstrap exchange '%s': PMIx_Get from rank %d failed: %s", key, root, PMIx_Error_string(rc));
    int ok = v->type == PMIX_BYTE_OBJECT && v->data.bo.size == outlen;
    if (ok && outlen) memcpy(out, v->data.bo.bytes, outlen);
    size_t got = v->type == PMIX_BYTE_OBJECT ? v->data.bo.size : 0;
    PMIX_VALUE_RELEASE(v);
    if (!ok) return lt_fail(err, errlen, "bootstrap exchange '%s': rank %d published %zu bytes, this rank expects %zu", key, root, got, outlen);
    return 0;
}

int lt_bootstrap_exchange(const char *key, const void *value, size_t len, int root, void *out, size_t outlen,
                          char *err, size_t errlen) {
    lt_comm_world_info w;
    if (lt_bootstrap(&w, err, errlen)) return -1;
    if (!key || !valid_name(key, MAX_KEY))
        return lt_fail(err, errlen, "bootstrap exchange: bad key '%s' (1 to %d characters of A-Z a-z 0-9 _ . -)",
                    key ? key : "(null)", MAX_KEY);
    if (root < 0 || root >= w.world_size)
        return lt_fail(err, errlen, "bootstrap exchange '%s': root %d outside the world of %d", key, root, w.world_size);
    if (outlen && !out) return lt_fail(err, errlen, "bootstrap exchange '%s': no output buffer", key);
    if (w.rank == root && len != outlen)
        return lt_fail(err, errlen, "bootstrap exchange '%s': root publishes %zu bytes but out holds %zu", key, len, outlen);
    if (w.rank == root && len && !value) return lt_fail(err, errlen, "bootstrap exchange '%s': no value", key);
    unsigned seq = exchange_seq++;
    if (launcher[0] == 'p') {
        if (!pmix_up) return lt_fail(err, errlen, "bootstrap exchange '%s': PMIx was finalized", key);
        return exchange_pmix(key, value, len, root, out, outlen, seq, err, errlen);
    }
    if (w.world_size == 1) {
        if (outlen) memmove(out, value, outlen);
        return 0;
    }
    return exchange_file(key, value, len, root, out, outlen, seq, err, errlen);
}
