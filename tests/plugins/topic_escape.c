/* hostile-topic: emits a valid message on "ok" first, then on suffixes that would leave its topic
 * (edgefleet/<device>/plugins/<name>/...): a climb to another topic, MQTT wildcards, an absolute
 * level. Every bad one is a fault, so nothing of the call, "ok" included, may be published. It keeps
 * calling after a refusal to show that a refusal, not the plugin, stops it.
 * Config `only` = "ok": emit only the valid message (the control: it does get published). */
#include "edgefleet_plugin.h"

static int only_ok;

EF_EXPORT(edgefleet_init) int32_t edgefleet_init(const char *json, int32_t len) {
    ef_span only = ef_get(ef_span_of(json, (size_t)len), "only");
    only_ok = only.p && ef_str_eq(only, "ok");
    return 0;
}

static int32_t emit(const char *suffix, const char *payload) {
    return ef_emit(suffix, (int32_t)strlen(suffix), payload, (int32_t)strlen(payload));
}

EF_EXPORT(edgefleet_on_prediction) int64_t edgefleet_on_prediction(const char *json, int32_t len) {
    static const char *const escapes[] = {"../../predictions/cam-1", "#", "/abs", "+/x"};
    (void)json;
    (void)len;
    if (emit("ok", "{\"escaped\":false}")) return EF_FAIL;
    if (only_ok) return EF_KEEP;
    for (size_t k = 0; k < sizeof escapes / sizeof escapes[0]; k++) emit(escapes[k], "{\"escaped\":true}");
    return EF_KEEP;
}
