/* hostile-malformed: returns a result document the host must refuse (a fault, never a changed
 * prediction). Config `kind`:
 *   "json" (default)  not JSON at all
 *   "action"          valid JSON, an action that does not exist
 *   "top"             "replace" without its classes
 *   "extra"           "drop" with a key the result has no place for
 *   "negative"        the plugin's own failure: a negative answer */
#include "edgefleet_plugin.h"

static const char *doc = "{\"action\": \"replace\", \"top\": [{\"index\": 1,";
static int64_t negative;

EF_EXPORT(edgefleet_init) int32_t edgefleet_init(const char *json, int32_t len) {
    ef_span kind = ef_get(ef_span_of(json, (size_t)len), "kind");
    if (!kind.p || ef_str_eq(kind, "json")) return 0;
    if (ef_str_eq(kind, "action")) doc = "{\"action\":\"explode\"}";
    else if (ef_str_eq(kind, "top")) doc = "{\"action\":\"replace\"}";
    else if (ef_str_eq(kind, "extra")) doc = "{\"action\":\"drop\",\"camera\":\"cam-9\"}";
    else if (ef_str_eq(kind, "negative")) negative = 1;
    else return 1;
    return 0;
}

EF_EXPORT(edgefleet_on_prediction) int64_t edgefleet_on_prediction(const char *json, int32_t len) {
    (void)json;
    (void)len;
    if (negative) return -7;
    return ef_result(doc, strlen(doc));
}
