/* Error reporting without aborting: the engine's functions write what went wrong into a buffer
 * the caller passes (char *err, size_t errlen), and return a failure value. */
#ifndef LT_ERROR_H
#define LT_ERROR_H
#include <stddef.h>

/* printf into err (when err and errlen allow); returns -1 so callers can `return lt_fail(...)`. */
int lt_fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
