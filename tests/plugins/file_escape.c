/* hostile-file: tries to read files through WASI and reports what it got on suffix "read", one
 * message per path: {"path", "ok", "bytes", "errno"}. Its spec grants one folder, /site; config:
 *   path     a file outside the grant (default /etc/passwd): must fail (ENOTCAPABLE, errno 76)
 *   escape   a path that climbs out of the grant (default /site/../../../etc/passwd): must fail
 *   inside   a file inside the grant (default /site/hello.txt): readable
 * An empty value skips that path. The prediction is kept. */
#include <errno.h>

#include "edgefleet_plugin.h"

static char paths[3][1024] = {"/etc/passwd", "/site/../../../etc/passwd", "/site/hello.txt"};
static char chunk[4096];
static ef_buf message;

EF_EXPORT(edgefleet_init) int32_t edgefleet_init(const char *json, int32_t len) {
    static const char *const keys[3] = {"path", "escape", "inside"};
    ef_span config = ef_span_of(json, (size_t)len);
    for (int k = 0; k < 3; k++) {
        ef_span v = ef_get(config, keys[k]);
        if (v.p && ef_str(v, paths[k], sizeof paths[k]) < 0) return 1;
    }
    return 0;
}

static void try_read(const char *path) {
    size_t bytes = 0;
    int error = 0;
    errno = 0;
    FILE *f = fopen(path, "rb");
    if (!f) {
        error = errno;
    } else {
        size_t got;
        while ((got = fread(chunk, 1, sizeof chunk, f)) > 0 && bytes < (1 << 20)) bytes += got;
        if (ferror(f)) error = errno ? errno : -1;
        fclose(f);
    }
    ef_buf_clear(&message);
    ef_puts(&message, "{\"path\":");
    ef_put_str(&message, path, strlen(path));
    ef_puts(&message, ",\"ok\":");
    ef_puts(&message, f && !error ? "true" : "false");
    ef_puts(&message, ",\"bytes\":");
    ef_put_int(&message, (int64_t)bytes);
    ef_puts(&message, ",\"errno\":");
    ef_put_int(&message, error);
    ef_puts(&message, "}");
    ef_emit_buf("read", &message);
}

EF_EXPORT(edgefleet_on_prediction) int64_t edgefleet_on_prediction(const char *json, int32_t len) {
    (void)json;
    (void)len;
    for (int k = 0; k < 3; k++)
        if (paths[k][0]) try_read(paths[k]);
    return EF_KEEP;
}
