/* hostile-loop: never returns from edgefleet_on_prediction. The host's fuel (or its deadline) must
 * stop it; the loop touches a volatile so that no compiler may assume it ends. */
#include "edgefleet_plugin.h"

static volatile uint32_t spins;

EF_EXPORT(edgefleet_on_prediction) int64_t edgefleet_on_prediction(const char *json, int32_t len) {
    (void)json;
    (void)len;
    for (;;) spins++;
}
