/* hostile-memory: allocates 64 KiB blocks until malloc fails (memory.grow refused at the page limit),
 * touching every byte so that the pages are really used, and then does what a careless program does
 * with the NULL: config `then`:
 *   "trap" (default)  writes just past the end of linear memory, as `p[size]` with p = NULL would on a
 *                     machine without address 0: an out-of-bounds trap (a fault)
 *   "keep"            stops there and emits {"pages", "bytes"} on suffix "grown" (how far it got, for
 *                     a test to compare with limits.memory_pages), keeping the prediction
 * Memory stays allocated across calls, so every call after the first fails at once. */
#include "edgefleet_plugin.h"

#define BLOCK (64 << 10)

static int keep_going;
static size_t total;
static void *blocks;
static ef_buf message;

EF_EXPORT(edgefleet_init) int32_t edgefleet_init(const char *json, int32_t len) {
    ef_span then = ef_get(ef_span_of(json, (size_t)len), "then");
    keep_going = then.p && ef_str_eq(then, "keep");
    return 0;
}

EF_EXPORT(edgefleet_on_prediction) int64_t edgefleet_on_prediction(const char *json, int32_t len) {
    (void)json;
    (void)len;
    char *block;
    while ((block = malloc(BLOCK)) != NULL) {
        memset(block, 0xAB, BLOCK);
        /* Kept on a list: a block nobody can reach again is one the compiler may never allocate. */
        *(void **)block = blocks;
        blocks = block;
        total += BLOCK;
    }
    if (!keep_going) {
        volatile char *past_the_end = (volatile char *)(__builtin_wasm_memory_size(0) * 65536);
        *past_the_end = 1; /* out of bounds: traps */
        return EF_KEEP;
    }
    ef_buf_clear(&message);
    ef_puts(&message, "{\"pages\":");
    ef_put_int(&message, (int64_t)__builtin_wasm_memory_size(0));
    ef_puts(&message, ",\"bytes\":");
    ef_put_int(&message, (int64_t)total);
    ef_puts(&message, "}");
    ef_emit_buf("grown", &message);
    return EF_KEEP;
}
