/* hostile-trap: executes `unreachable` in edgefleet_on_prediction, as a C program's abort() would. */
#include "edgefleet_plugin.h"

EF_EXPORT(edgefleet_on_prediction) int64_t edgefleet_on_prediction(const char *json, int32_t len) {
    (void)json;
    if (len >= 0) __builtin_trap();
    return EF_KEEP;
}
