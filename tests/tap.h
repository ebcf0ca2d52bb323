/* Minimal TAP output for C tests: `luatron test` counts the ok / not ok lines of every test.
 *   TAP_CHECK(cond, "what is checked %d", x);   ...   return tap_done();  */
#ifndef LT_TAP_H
#define LT_TAP_H
#include <stdarg.h>
#include <stdio.h>

static int tap_count, tap_failed;

static void tap_result(int ok, const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s %d - ", ok ? "ok" : "not ok", ++tap_count);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (!ok) {
        tap_failed++;
        printf("#   failed at %s:%d\n", file, line);
    }
    fflush(stdout);
}

#define TAP_CHECK(cond, ...) tap_result((cond) ? 1 : 0, __FILE__, __LINE__, __VA_ARGS__)

static int tap_done(void) {
    printf("1..%d\n", tap_count);
    return tap_failed ? 1 : 0;
}
#endif
