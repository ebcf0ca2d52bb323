// The C interface of sentencepiece_shim.h over SentencePiece's C++ SentencePieceProcessor. No C++
// exception crosses into C: each entry point catches what the library or the allocator throws.
#include "engine/data/sentencepiece_shim.h"

#include <sentencepiece_processor.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

struct lt_spm {
    sentencepiece::SentencePieceProcessor sp;
};

namespace {

int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

int fail(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        std::vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

}  // namespace

extern "C" lt_spm *lt_spm_open(const char *path, char *err, size_t errlen) {
    // Opened here first so that a missing or unreadable file says so in the engine's own words.
    std::FILE *f = std::fopen(path, "rb");
    if (!f) {
        fail(err, errlen, "%s: cannot open: %s", path, std::strerror(errno));
        return nullptr;
    }
    struct stat st;
    const bool folder = fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode);
    std::fclose(f);
    if (folder) {
        fail(err, errlen, "%s: is a folder: give the SentencePiece .model file itself (spm_train's --model_prefix "
             "plus .model)", path);
        return nullptr;
    }
    lt_spm *m = nullptr;
    try {
        m = new lt_spm;
        const auto status = m->sp.Load(path);
        if (!status.ok()) {
            std::string why = status.ToString();
            while (!why.empty() && why.back() == ' ') why.pop_back();
            fail(err, errlen, "%s: not a SentencePiece model (libsentencepiece: %s); give the .model file that "
                 "spm_train wrote", path, why.c_str());
            delete m;
            return nullptr;
        }
        if (m->sp.GetPieceSize() <= 0) {
            fail(err, errlen, "%s: the SentencePiece model has no pieces", path);
            delete m;
            return nullptr;
        }
        return m;
    } catch (const std::exception &e) {
        fail(err, errlen, "%s: cannot load the SentencePiece model: %s", path, e.what());
    } catch (...) {
        fail(err, errlen, "%s: cannot load the SentencePiece model", path);
    }
    delete m;
    return nullptr;
}

extern "C" void lt_spm_free(lt_spm *m) { delete m; }

extern "C" int32_t lt_spm_size(const lt_spm *m) { return m->sp.GetPieceSize(); }

extern "C" const char *lt_spm_id_to_piece(const lt_spm *m, int32_t id, size_t *n) {
    if (id < 0 || id >= m->sp.GetPieceSize()) return nullptr;
    const std::string &s = m->sp.IdToPiece(id);
    *n = s.size();
    return s.data();
}

extern "C" int32_t lt_spm_pad_id(const lt_spm *m) { return m->sp.pad_id(); }
extern "C" int32_t lt_spm_bos_id(const lt_spm *m) { return m->sp.bos_id(); }
extern "C" int32_t lt_spm_eos_id(const lt_spm *m) { return m->sp.eos_id(); }

extern "C" int lt_spm_encode(const lt_spm *m, const char *text, size_t n, int32_t **ids, size_t *nids, char *err,
                             size_t errlen) {
    *ids = nullptr;
    *nids = 0;
    try {
        std::vector<int> v;
        const auto status = m->sp.Encode(std::string_view(text, n), &v);
        if (!status.ok()) return fail(err, errlen, "SentencePiece encode: %s", status.ToString().c_str());
        if (v.empty()) return 0;
        int32_t *r = static_cast<int32_t *>(std::malloc(v.size() * sizeof(int32_t)));
        if (!r) return fail(err, errlen, "out of memory");
        for (size_t i = 0; i < v.size(); i++) r[i] = v[i];
        *ids = r;
        *nids = v.size();
        return 0;
    } catch (const std::exception &e) {
        return fail(err, errlen, "SentencePiece encode: %s", e.what());
    }
}

extern "C" int lt_spm_decode(const lt_spm *m, const int32_t *ids, size_t n, char **out, size_t *outlen, char *err,
                             size_t errlen) {
    *out = nullptr;
    *outlen = 0;
    try {
        const int size = m->sp.GetPieceSize();
        for (size_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= size)
                return fail(err, errlen, "id %d is not a piece of the SentencePiece model (0..%d)", (int)ids[i],
                            size - 1);
        std::string s;
        const auto status = m->sp.Decode(std::vector<int>(ids, ids + n), &s);
        if (!status.ok()) return fail(err, errlen, "SentencePiece decode: %s", status.ToString().c_str());
        char *r = static_cast<char *>(std::malloc(s.size() + 1));
        if (!r) return fail(err, errlen, "out of memory");
        std::memcpy(r, s.data(), s.size());
        r[s.size()] = 0;
        *out = r;
        *outlen = s.size();
        return 0;
    } catch (const std::exception &e) {
        return fail(err, errlen, "SentencePiece decode: %s", e.what());
    }
}
