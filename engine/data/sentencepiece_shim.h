/* A C interface to a SentencePiece model (the system's libsentencepiece, C++): load a .model file,
 * its pieces and special ids, encode text to ids and decode ids to text. sentencepiece_shim.cc is
 * the only C++ in the engine; Megatron's wrapper logic over it is C (sentencepiece_tokenizer.c).
 * Every function that can fail returns -1 (or NULL) with a message in err. */
#ifndef LT_DATA_SENTENCEPIECE_SHIM_H
#define LT_DATA_SENTENCEPIECE_SHIM_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lt_spm lt_spm;

/* Loads the model file at path; NULL with a message naming the file when it is missing or not a
 * SentencePiece model. */
lt_spm *lt_spm_open(const char *path, char *err, size_t errlen);
void lt_spm_free(lt_spm *m);
/* The number of pieces (ids 0 .. size-1). */
int32_t lt_spm_size(const lt_spm *m);
/* The piece of id (0 <= id < size): its bytes, *n set; NULL when id is out of range. */
const char *lt_spm_id_to_piece(const lt_spm *m, int32_t id, size_t *n);
/* The model's special ids as its trainer set them; -1 when the model has none. */
int32_t lt_spm_pad_id(const lt_spm *m);
int32_t lt_spm_bos_id(const lt_spm *m);
int32_t lt_spm_eos_id(const lt_spm *m);
/* text[0..n) to ids (no BOS/EOS added), malloc'd into *ids (*nids of them; NULL when none). */
int lt_spm_encode(const lt_spm *m, const char *text, size_t n, int32_t **ids, size_t *nids, char *err,
                  size_t errlen);
/* ids[0..n) to text, malloc'd and NUL-terminated (*outlen without the NUL); fails on an id out of range. */
int lt_spm_decode(const lt_spm *m, const int32_t *ids, size_t n, char **out, size_t *outlen, char *err,
                  size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
