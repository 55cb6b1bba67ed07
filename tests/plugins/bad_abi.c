/* hostile-abi: claims plugin ABI 2, which this host does not speak: the load must be refused with
 * both versions named. Everything else is a well-behaved plugin. */
#define EDGEFLEET_OWN_ABI_VERSION
#include "edgefleet_plugin.h"

EF_EXPORT(edgefleet_abi_version) int32_t edgefleet_abi_version(void) { return 2; }

EF_EXPORT(edgefleet_on_prediction) int64_t edgefleet_on_prediction(const char *json, int32_t len) {
    (void)json;
    (void)len;
    return EF_KEEP;
}
