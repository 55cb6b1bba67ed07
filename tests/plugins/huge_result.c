/* hostile-huge-result: returns a valid pointer with a length of 0x7fffffff (2 GiB - 1), far past its
 * memory and any limits.result_bytes. The host must refuse it from the length alone, never copy it. */
#include "edgefleet_plugin.h"

static char doc[] = "{\"action\":\"keep\"}";

EF_EXPORT(edgefleet_on_prediction) int64_t edgefleet_on_prediction(const char *json, int32_t len) {
    (void)json;
    (void)len;
    return ef_result(doc, 0x7fffffff);
}
