/* Megatron-LM indexed dataset (.idx + .bin), "MMIDIDX" format, version 1.
 *
 * prefix.idx (little endian, packed, no alignment):
 *   9 bytes  magic "MMIDIDX\0\0"
 *   u64      version = 1
 *   u8       dtype code of the tokens in .bin (see lt_indexed_dtype)
 *   u64      S = number of sequences
 *   u64      D = number of document-index entries (documents + 1)
 *   i32[S]   sequence lengths (tokens)
 *   i64[S]   sequence byte offsets into .bin
 *   i64[D]   document index: sequence number where each document starts; starts at 0, ends at S
 *   i8[S]    optional (multimodal datasets only) sequence modes
 * prefix.bin: the tokens of every sequence, back to back, in the dtype.
 *
 * Every function reports failure by return value with a message in err (may be NULL). */
#ifndef LT_DATA_INDEXED_H
#define LT_DATA_INDEXED_H
#include <stddef.h>
#include <stdint.h>

/* dtype codes, as Megatron's DType enum. */
enum {
    LT_DTYPE_UINT8 = 1,
    LT_DTYPE_INT8 = 2,
    LT_DTYPE_INT16 = 3,
    LT_DTYPE_INT32 = 4,
    LT_DTYPE_INT64 = 5,
    LT_DTYPE_FLOAT64 = 6,
    LT_DTYPE_FLOAT32 = 7,
    LT_DTYPE_UINT16 = 8,
};

/* Bytes per token for a dtype code; 0 for an unknown code. */
int lt_indexed_dtype_size(int dtype);
/* "uint16", ...; "unknown" for an unknown code. */
const char *lt_indexed_dtype_name(int dtype);
/* Megatron's DType.optimal_dtype: uint16 when vocab_size < 65500, else int32. */
int lt_indexed_optimal_dtype(int64_t vocab_size);

/* ---- reader ---- */
typedef struct lt_indexed lt_indexed;

/* Maps prefix.idx and prefix.bin and validates them completely (header, sizes, every
 * pointer and length against .bin, document index). NULL on error. */
lt_indexed *lt_indexed_open(const char *prefix, char *err, size_t errlen);
void lt_indexed_close(lt_indexed *ds);

const char *lt_indexed_prefix(const lt_indexed *ds);
int lt_indexed_dtype(const lt_indexed *ds);
int64_t lt_indexed_num_sequences(const lt_indexed *ds);
/* Documents = document-index entries - 1. */
int64_t lt_indexed_num_documents(const lt_indexed *ds);
/* Length of sequence i (0 <= i < num_sequences; out of range gives -1). */
int64_t lt_indexed_sequence_length(const lt_indexed *ds, int64_t i);
/* Document d spans sequences [first, end): entries d and d+1 of the document index. */
int64_t lt_indexed_document_start(const lt_indexed *ds, int64_t d);
/* Total tokens over all sequences. */
int64_t lt_indexed_num_tokens(const lt_indexed *ds);
/* 1 when the .idx carries sequence modes (multimodal). */
int lt_indexed_multimodal(const lt_indexed *ds);

/* Reads tokens [offset, offset+count) of sequence i into out, converted to int32.
 * Fails on a range outside the sequence and on ids that are negative, not integral
 * (float dtypes) or above INT32_MAX. Returns 0 on success, -1 on error. */
int lt_indexed_read(const lt_indexed *ds, int64_t i, int64_t offset, int64_t count, int32_t *out,
                    char *err, size_t errlen);

/* ---- writer ----
 * Tokens go to prefix.bin.tmp.<pid>, the index to prefix.idx.tmp.<pid>; finalize renames
 * .bin then .idx into place, so a reader never sees a half-written pair. */
typedef struct lt_indexed_writer lt_indexed_writer;

/* dtype: one of the integer codes (uint8, int8, int16, int32, int64, uint16); pick it with
 * lt_indexed_optimal_dtype(vocab_size) for Megatron's choice. */
lt_indexed_writer *lt_indexed_writer_open(const char *prefix, int dtype, char *err, size_t errlen);
/* Appends one sequence; ids must fit the dtype. */
int lt_indexed_writer_add(lt_indexed_writer *w, const int32_t *tokens, int64_t n, char *err,
                          size_t errlen);
/* Closes the current document (Megatron's end_document). */
int lt_indexed_writer_end_document(lt_indexed_writer *w, char *err, size_t errlen);
int64_t lt_indexed_writer_num_sequences(const lt_indexed_writer *w);
int64_t lt_indexed_writer_num_documents(const lt_indexed_writer *w);
int64_t lt_indexed_writer_num_tokens(const lt_indexed_writer *w);
/* Ends a pending document, writes the index, renames both files into place and frees w
 * (also on error, after removing the temporary files). */
int lt_indexed_writer_finalize(lt_indexed_writer *w, char *err, size_t errlen);
/* Drops everything written so far and frees w. */
void lt_indexed_writer_abort(lt_indexed_writer *w);

#endif
