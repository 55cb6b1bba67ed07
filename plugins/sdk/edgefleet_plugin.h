/* The C side of the edgefleet plugin ABI, version 1 (docs/plugins.md is the contract).
 *
 * A plugin is one C file that includes this header once and defines
 *
 *     EF_EXPORT(edgefleet_on_prediction)
 *     int64_t edgefleet_on_prediction(const char *json, int32_t len) { ... return EF_KEEP; }
 *
 * and, if it takes configuration, `edgefleet_init` (EF_EXPORT(edgefleet_init) int32_t
 * edgefleet_init(const char *config, int32_t len)). This header defines the other required exports
 * (`edgefleet_abi_version`, `edgefleet_alloc`), the host's imports, a bounded JSON reader for the
 * prediction and the configuration, and a JSON writer for results and emitted messages.
 *
 * Build: clang-14 --target=wasm32-wasi -O2 -mexec-model=reactor -Iplugins/sdk -o x.wasm plugin.c
 *
 * Everything here is `static inline` so that a plugin pays only for what it uses; no third-party code.
 */
#ifndef EDGEFLEET_PLUGIN_H
#define EDGEFLEET_PLUGIN_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EDGEFLEET_ABI_VERSION 1

#define EF_EXPORT(name) __attribute__((export_name(#name)))
#define EF_IMPORT(name) __attribute__((import_module("edgefleet"), import_name(#name)))

/* ---- Host imports (module "edgefleet"). The linker imports only those a plugin calls. ---- */

enum { EF_DEBUG = 10, EF_INFO = 20, EF_WARNING = 30, EF_ERROR = 40 };

/* A line in the service's log (cut at 1 KiB, 16 lines per call). */
EF_IMPORT(log) void ef_log(int32_t level, const char *text, int32_t len);
/* Wall clock, milliseconds since the Unix epoch (UTC). */
EF_IMPORT(now_ms) int64_t ef_now_ms(void);
/* Queues a message on edgefleet/<device>/plugins/<name>/<suffix>: 0 queued, -1 a bad suffix (a
 * fault: nothing queued in this call is published), -2 over limits.emits / limits.emit_bytes. */
EF_IMPORT(emit) int32_t ef_emit(const char *suffix, int32_t suffix_len, const void *payload, int32_t payload_len);
/* Copies the encoded frame to `buf`: its length, or the length needed when over `cap` (nothing
 * copied; ef_frame(NULL, 0) asks for the length); negative: not granted / no frame. */
EF_IMPORT(frame) int32_t ef_frame(void *buf, int32_t cap);
/* Runs the served model on a rectangle of an encoded image (w = h = 0: all of it); writes one
 * probability per class to `out` (out_cap in bytes) and returns the number of classes, or -1 not
 * granted, -2 undecodable / rectangle outside, -3 out_cap too small, -4 over limits.infer_calls. */
EF_IMPORT(infer) int32_t ef_infer(const void *image, int32_t image_len, int32_t x, int32_t y, int32_t w, int32_t h,
                                  float *out, int32_t out_cap);
/* The same for a ready float32 NCHW 1x3xcropxcrop tensor (`len` in bytes). */
EF_IMPORT(infer_tensor) int32_t ef_infer_tensor(const float *tensor, int32_t len, float *out, int32_t out_cap);

static inline void ef_log_str(int32_t level, const char *text) { ef_log(level, text, (int32_t)strlen(text)); }

/* ---- Required exports. ---- */

/* A test plugin that must lie about its ABI defines EDGEFLEET_OWN_ABI_VERSION and its own export. */
#ifndef EDGEFLEET_OWN_ABI_VERSION
EF_EXPORT(edgefleet_abi_version) int32_t edgefleet_abi_version(void) { return EDGEFLEET_ABI_VERSION; }
#endif

/* The host's input buffer. It must come from malloc: a static buffer would cap the input at build
 * time, and the host may ask again for a larger one. The plugin never frees it (the host owns it). */
EF_EXPORT(edgefleet_alloc) int32_t edgefleet_alloc(int32_t size) {
    if (size < 0) return 0;
    return (int32_t)(uintptr_t)malloc(size ? (size_t)size : 1);
}

/* What edgefleet_on_prediction returns. */
#define EF_KEEP ((int64_t)0)
#define EF_FAIL ((int64_t)-1)
/* A result document at `doc` (the plugin keeps it alive until its next call). Pointers fit 31
 * bits (memory is at most 4096 pages), so the packed value is never negative. */
static inline int64_t ef_result(const char *doc, size_t len) {
    return (int64_t)(((uint64_t)(uintptr_t)doc << 32) | (uint32_t)len);
}

/* ---- A JSON reader: enough for a Prediction and a config object. ----
 * It works on spans of the input: it never copies a container, never recurses, never reads past
 * the length it is given, and gives up (-1 / NULL span) at a byte that breaks the structure
 * (brackets, strings, commas), so a hostile or truncated document costs at most a pass or two.
 * It checks structure, not every rule of JSON: a value is checked when it is read (ef_str, ef_num).
 * Key order and whitespace do not matter. Duplicate keys: the first wins. The host's input is
 * valid JSON (pydantic's), so this is robustness, not a validator. */

#define EF_JSON_MAX_DEPTH 64

typedef struct {
    const char *p; /* one JSON value (or NULL: none) */
    size_t n;
} ef_span;

static inline int ef__ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static inline size_t ef__skip_ws(const char *s, size_t n, size_t i) {
    while (i < n && ef__ws(s[i])) i++;
    return i;
}

static inline int ef__hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

/* The index after the string whose opening quote is at s[i], or 0 when it is not one. Its escapes
 * are checked here, so a string span copied as it is (ef_put_span) is always a valid JSON string. */
static inline size_t ef__string_end(const char *s, size_t n, size_t i) {
    if (i >= n || s[i] != '"') return 0;
    for (i++; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"') return i + 1;
        if (c < 0x20) return 0; /* raw control characters are not allowed in JSON strings */
        if (c != '\\') continue;
        if (++i >= n || !strchr("\"\\/bfnrtu", s[i]) || s[i] == '\0') return 0;
        if (s[i] == 'u' && (i + 4 >= n || !ef__hex(s[i + 1]) || !ef__hex(s[i + 2]) || !ef__hex(s[i + 3]) ||
                            !ef__hex(s[i + 4])))
            return 0;
    }
    return 0;
}

/* The index after the value that starts at s[i] (no leading whitespace), or 0 when there is none.
 * Containers are matched with a fixed stack, so nesting deeper than EF_JSON_MAX_DEPTH is refused. */
static inline size_t ef__value_end(const char *s, size_t n, size_t i) {
    char stack[EF_JSON_MAX_DEPTH];
    size_t depth = 0;
    if (i >= n) return 0;
    do {
        char c = s[i];
        if (c == '"') {
            if (!(i = ef__string_end(s, n, i))) return 0;
        } else if (c == '{' || c == '[') {
            if (depth == EF_JSON_MAX_DEPTH) return 0;
            stack[depth++] = c == '{' ? '}' : ']';
            i++;
        } else if (c == '}' || c == ']') {
            if (!depth || stack[--depth] != c) return 0;
            i++;
        } else if (depth && (c == ',' || c == ':' || ef__ws(c))) {
            i++;
        } else {
            /* a number or a literal: the characters they can hold */
            size_t start = i;
            while (i < n && (s[i] == '-' || s[i] == '+' || s[i] == '.' || (s[i] >= '0' && s[i] <= '9') ||
                             (s[i] >= 'a' && s[i] <= 'z') || s[i] == 'E'))
                i++;
            if (i == start) return 0;
        }
    } while (depth && i < n);
    return depth ? 0 : i;
}

/* A span over a whole document (surrounding whitespace ignored); .p is NULL when it is not one value. */
static inline ef_span ef_span_of(const char *s, size_t n) {
    size_t i = ef__skip_ws(s, n, 0), end = ef__value_end(s, n, i);
    ef_span none = {NULL, 0};
    if (!end || ef__skip_ws(s, n, end) != n) return none;
    ef_span v = {s + i, end - i};
    return v;
}

static inline int ef_is_string(ef_span v) { return v.p && v.n >= 2 && v.p[0] == '"'; }

/* Appends the UTF-8 of code point `cp` to out[*len] if it fits in `cap`; 0 when it does not. */
static inline int ef__utf8(char *out, size_t cap, size_t *len, uint32_t cp) {
    unsigned char b[4];
    size_t k;
    if (cp < 0x80) { b[0] = (unsigned char)cp; k = 1; }
    else if (cp < 0x800) { b[0] = (unsigned char)(0xC0 | cp >> 6); b[1] = (unsigned char)(0x80 | (cp & 0x3F)); k = 2; }
    else if (cp < 0x10000) {
        b[0] = (unsigned char)(0xE0 | cp >> 12); b[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (unsigned char)(0x80 | (cp & 0x3F)); k = 3;
    } else {
        b[0] = (unsigned char)(0xF0 | cp >> 18); b[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F)); b[3] = (unsigned char)(0x80 | (cp & 0x3F)); k = 4;
    }
    if (*len + k >= cap) return 0; /* keep room for the terminating NUL */
    memcpy(out + *len, b, k);
    *len += k;
    return 1;
}

static inline int ef__hex4(const char *p, uint32_t *out) {
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        char c = p[k];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

/* Decodes a string value into `out` (UTF-8, NUL-terminated): its length in bytes, or -1 when the
 * value is not a string or does not fit in `cap` (never a silently truncated string). A lone
 * surrogate becomes U+FFFD, as Python's decoders would not let it through either. */
static inline int ef_str(ef_span v, char *out, size_t cap) {
    size_t len = 0;
    if (!ef_is_string(v) || cap == 0) return -1;
    for (size_t i = 1; i + 1 < v.n; i++) {
        char c = v.p[i];
        if (c != '\\') {
            if (len + 1 >= cap) return -1;
            out[len++] = c;
            continue;
        }
        if (++i + 1 >= v.n) return -1;
        uint32_t cp;
        switch (v.p[i]) {
        case '"': cp = '"'; break;
        case '\\': cp = '\\'; break;
        case '/': cp = '/'; break;
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u':
            if (i + 5 >= v.n || !ef__hex4(v.p + i + 1, &cp)) return -1;
            i += 4;
            if (cp >= 0xD800 && cp < 0xDC00) { /* a high surrogate: a low one should follow */
                uint32_t lo;
                if (i + 7 < v.n && v.p[i + 1] == '\\' && v.p[i + 2] == 'u' && ef__hex4(v.p + i + 3, &lo) &&
                    lo >= 0xDC00 && lo < 0xE000) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    i += 6;
                } else {
                    cp = 0xFFFD;
                }
            } else if (cp >= 0xDC00 && cp < 0xE000) {
                cp = 0xFFFD;
            }
            break;
        default: return -1;
        }
        if (!ef__utf8(out, cap, &len, cp)) return -1;
    }
    out[len] = '\0';
    return (int)len;
}

/* 1 when string value `v` decodes to exactly `want`. */
static inline int ef_str_eq(ef_span v, const char *want) {
    size_t want_len = strlen(want);
    if (!ef_is_string(v)) return 0;
    if (!memchr(v.p, '\\', v.n)) /* the usual case: compare in place */
        return v.n - 2 == want_len && memcmp(v.p + 1, want, want_len) == 0;
    char buf[256];
    int len = ef_str(v, buf, sizeof buf);
    return len >= 0 && (size_t)len == want_len && memcmp(buf, want, want_len) == 0;
}

/* Scores look like 0.123456789: up to 15 significant digits with no exponent is m / 10^k with m and
 * 10^k exact doubles, so one division is correctly rounded (Clinger's fast path) and costs a tenth
 * of strtod. Anything else: 0, and strtod decides. */
static inline int ef__fast_num(const char *s, size_t n, double *out) {
    static const double tens[] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15};
    size_t i = 0, digits = 0, decimals = 0;
    int negative = s[0] == '-', point = 0;
    uint64_t m = 0;
    for (i = (size_t)negative; i < n; i++) {
        if (s[i] == '.' && !point) point = 1;
        else if (s[i] >= '0' && s[i] <= '9') {
            if (m || s[i] != '0') digits++;
            if (digits > 15) return 0;
            m = m * 10 + (uint64_t)(s[i] - '0');
            decimals += (size_t)point;
        } else return 0;
    }
    *out = (negative ? -(double)m : (double)m) / tens[decimals > 15 ? 15 : decimals];
    return decimals <= 15;
}

/* Reads a number value (JSON grammar only: no "nan", no hex, no leading '+'): 0, or -1. */
static inline int ef_num(ef_span v, double *out) {
    char buf[64];
    size_t i = 0;
    if (!v.p || v.n == 0 || v.n >= sizeof buf) return -1;
    memcpy(buf, v.p, v.n);
    buf[v.n] = '\0';
    if (buf[i] == '-') i++;
    if (buf[i] < '0' || buf[i] > '9') return -1;
    for (; i < v.n; i++)
        if (!strchr("0123456789.eE+-", buf[i])) return -1;
    if (ef__fast_num(buf, v.n, out)) return 0;
    char *end;
    double d = strtod(buf, &end);
    if (*end != '\0' || !isfinite(d)) return -1;
    *out = d;
    return 0;
}

/* Reads an integer value: 0, or -1 when it is not a number or not a whole one. */
static inline int ef_int(ef_span v, int64_t *out) {
    double d;
    if (ef_num(v, &d) || d != floor(d) || d < -9007199254740992.0 || d > 9007199254740992.0) return -1;
    *out = (int64_t)d;
    return 0;
}

/* The value of `key` in object `obj`; .p is NULL when obj is not an object or has no such key. */
static inline ef_span ef_get(ef_span obj, const char *key) {
    ef_span none = {NULL, 0};
    if (!obj.p || obj.n < 2 || obj.p[0] != '{') return none;
    const char *s = obj.p;
    size_t n = obj.n, i = ef__skip_ws(s, n, 1);
    if (i < n && s[i] == '}') return none;
    while (i < n) {
        size_t key_end = ef__string_end(s, n, i);
        if (!key_end) return none;
        ef_span k = {s + i, key_end - i};
        i = ef__skip_ws(s, n, key_end);
        if (i >= n || s[i] != ':') return none;
        i = ef__skip_ws(s, n, i + 1);
        size_t end = ef__value_end(s, n, i);
        if (!end) return none;
        if (ef_str_eq(k, key)) {
            ef_span v = {s + i, end - i};
            return v;
        }
        i = ef__skip_ws(s, n, end);
        if (i >= n || s[i] != ',') return none; /* '}' (the end) or a malformed object */
        i = ef__skip_ws(s, n, i + 1);
    }
    return none;
}

/* Walks an array: ef_iter it = ef_iter_of(arr); ef_span item; while (ef_next(&it, &item)) {...}
 * it.failed says whether the walk stopped at a malformed byte rather than at the end. */
typedef struct {
    const char *s;
    size_t n, i, count;
    int failed;
} ef_iter;

static inline ef_iter ef_iter_of(ef_span arr) {
    ef_iter it = {arr.p, arr.n, 1, 0, 0};
    if (!arr.p || arr.n < 2 || arr.p[0] != '[') {
        it.n = 0;
        it.failed = 1;
    }
    return it;
}

static inline int ef_next(ef_iter *it, ef_span *item) {
    size_t i = ef__skip_ws(it->s, it->n, it->i);
    if (i >= it->n || it->s[i] == ']') return 0;
    if (it->count) { /* past the first item: a comma separates */
        if (it->s[i] != ',') { it->failed = 1; it->n = 0; return 0; }
        i = ef__skip_ws(it->s, it->n, i + 1);
    }
    size_t end = ef__value_end(it->s, it->n, i);
    if (!end) { it->failed = 1; it->n = 0; return 0; }
    item->p = it->s + i;
    item->n = end - i;
    it->i = end;
    it->count++;
    return 1;
}

/* Config values are strings ({"min_score": "0.4"}): a whole-string number, or -1. */
static inline int ef_parse_num(const char *text, double *out) {
    char *end;
    if (!*text) return -1;
    double d = strtod(text, &end);
    if (*end != '\0' || !isfinite(d)) return -1;
    *out = d;
    return 0;
}

static inline int ef_parse_int(const char *text, int64_t *out) {
    double d;
    if (ef_parse_num(text, &d) || d != floor(d) || d < -2147483648.0 || d > 2147483647.0) return -1;
    *out = (int64_t)d;
    return 0;
}

/* ---- A JSON writer: a growing buffer for results and emitted messages. ----
 * It stops growing at EF_BUF_MAX (over any limit the host allows) and on a failed malloc, and then
 * marks itself failed rather than writing a cut document. */

#define EF_BUF_MAX ((size_t)1 << 20)

typedef struct {
    char *p;
    size_t len, cap;
    int failed;
} ef_buf;

/* Empties the buffer but keeps its memory: a result lives until the plugin's next call. */
static inline void ef_buf_clear(ef_buf *b) {
    b->len = 0;
    b->failed = 0;
}

static inline int ef__reserve(ef_buf *b, size_t more) {
    if (b->failed) return 0;
    if (more > EF_BUF_MAX - b->len) { b->failed = 1; return 0; }
    if (b->len + more <= b->cap) return 1;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) { b->failed = 1; return 0; }
    b->p = p;
    b->cap = cap;
    return 1;
}

static inline void ef_put(ef_buf *b, const char *s, size_t n) {
    if (ef__reserve(b, n)) {
        memcpy(b->p + b->len, s, n);
        b->len += n;
    }
}

static inline void ef_puts(ef_buf *b, const char *s) { ef_put(b, s, strlen(s)); }

/* A value span copied as it is (e.g. a string of the prediction echoed into a message). */
static inline void ef_put_span(ef_buf *b, ef_span v) {
    if (!v.p) b->failed = 1;
    else ef_put(b, v.p, v.n);
}

/* A JSON string, quoted; `s` is UTF-8 (bytes from 0x80 are copied as they are). */
static inline void ef_put_str(ef_buf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    ef_put(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            ef_put(b, esc, 2);
        } else if (c < 0x20) {
            char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            ef_put(b, esc, 6);
        } else {
            ef_put(b, (const char *)&c, 1);
        }
    }
    ef_put(b, "\"", 1);
}

static inline void ef_put_int(ef_buf *b, int64_t v) {
    char tmp[24];
    int k = snprintf(tmp, sizeof tmp, "%lld", (long long)v);
    ef_put(b, tmp, (size_t)k);
}

/* A number in the fewest digits (15-17) that read back as the same double, so 0.6 stays "0.6";
 * JSON has no NaN or infinity, so those fail the buffer. */
static inline void ef_put_num(ef_buf *b, double v) {
    char tmp[32];
    int k = 0;
    if (!isfinite(v)) { b->failed = 1; return; }
    /* Fast path for a number with at most 5 decimals (every score and timing the service sends): written
     * from its scaled integer. r / 1e5 is correctly rounded, so when it equals v the text reads back as v
     * exactly. snprintf + strtod cost ~5,400 fuel per number in wasi-libc (night-alert: 88.5k fuel per alert
     * before, 83.1k after). Checked against strtod on 2M scaled and arbitrary values when written. */
    double scaled = v * 100000.0;
    if (fabs(scaled) < 9e15) {
        int64_t r = (int64_t)(scaled < 0 ? scaled - 0.5 : scaled + 0.5);
        if ((double)r / 100000.0 == v) {
            uint64_t a = r < 0 ? (uint64_t)(-r) : (uint64_t)r, whole = a / 100000, frac = a % 100000;
            char digits[24];
            int n = 0, width = 5;
            if (r < 0) tmp[k++] = '-';
            do { digits[n++] = (char)('0' + whole % 10); whole /= 10; } while (whole);
            while (n) tmp[k++] = digits[--n];
            while (width && frac % 10 == 0 && frac) { frac /= 10; width--; }
            if (frac) {
                tmp[k++] = '.';
                for (int i = width - 1; i >= 0; i--) { tmp[k + i] = (char)('0' + frac % 10); frac /= 10; }
                k += width;
            }
            ef_put(b, tmp, (size_t)k);
            return;
        }
    }
    for (int digits = 15; digits <= 17; digits++) {
        k = snprintf(tmp, sizeof tmp, "%.*g", digits, v);
        if (strtod(tmp, NULL) == v) break;
    }
    ef_put(b, tmp, (size_t)k);
}

/* Emits the buffer on `suffix` (see ef_emit); -3 when the buffer failed. */
static inline int32_t ef_emit_buf(const char *suffix, const ef_buf *b) {
    if (b->failed) return -3;
    return ef_emit(suffix, (int32_t)strlen(suffix), b->p, (int32_t)b->len);
}

/* Returns the buffer as the call's result document, or EF_FAIL when it could not be written. */
static inline int64_t ef_result_buf(const ef_buf *b) { return b->failed || !b->p ? EF_FAIL : ef_result(b->p, b->len); }

#endif
