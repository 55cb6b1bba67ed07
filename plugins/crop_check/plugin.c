/* crop-check: asks the served model about one rectangle of the frame (wasi-nn style `infer`) and
 * emits that crop's top-1 class on suffix "top1" as {"frame_id","index","score"}; the prediction is
 * kept. The heavy maths stays in the host: the plugin only moves the encoded frame and reads back
 * the probabilities.
 *
 * Config: x, y, w, h: the rectangle in pixels (default 0: w = h = 0 is the whole image).
 * Grants: frame, infer; limits.infer_calls >= 1.
 */
#include "edgefleet_plugin.h"

/* Room for the probabilities: the host answers -3 when a model has more classes than this. */
#define MAX_CLASSES 16384

static int64_t crop[4]; /* x, y, w, h */
static char *frame;
static size_t frame_cap;
static float *probabilities;
static ef_buf message;

EF_EXPORT(edgefleet_init) int32_t edgefleet_init(const char *json, int32_t len) {
    static const char *const keys[4] = {"x", "y", "w", "h"};
    ef_span config = ef_span_of(json, (size_t)len);
    if (!config.p || config.p[0] != '{') {
        ef_log_str(EF_ERROR, "crop-check: the config is not a JSON object");
        return 1;
    }
    for (int k = 0; k < 4; k++) {
        char text[32];
        ef_span v = ef_get(config, keys[k]);
        if (v.p && (ef_str(v, text, sizeof text) < 0 || ef_parse_int(text, &crop[k]) || crop[k] < 0)) {
            ef_log_str(EF_ERROR, "crop-check: x, y, w and h must be whole numbers from 0");
            return 1;
        }
    }
    if ((crop[2] == 0) != (crop[3] == 0)) {
        ef_log_str(EF_ERROR, "crop-check: w and h are both 0 (the whole image) or both set");
        return 1;
    }
    probabilities = malloc(MAX_CLASSES * sizeof(float));
    return probabilities ? 0 : 1;
}

/* The frame in `frame` (grown as needed): its length, or -1 when there is none to have. */
static int32_t fetch_frame(void) {
    int32_t need = ef_frame(frame, (int32_t)frame_cap);
    if (need < 0) return -1;
    if ((size_t)need > frame_cap) {
        char *bigger = realloc(frame, (size_t)need);
        if (!bigger) return -1;
        frame = bigger;
        frame_cap = (size_t)need;
        if (ef_frame(frame, (int32_t)frame_cap) != need) return -1;
    }
    return need;
}

EF_EXPORT(edgefleet_on_prediction) int64_t edgefleet_on_prediction(const char *json, int32_t len) {
    if (!probabilities && !(probabilities = malloc(MAX_CLASSES * sizeof(float)))) return EF_FAIL;
    ef_span frame_id = ef_get(ef_span_of(json, (size_t)len), "frame_id");
    if (!ef_is_string(frame_id)) return EF_FAIL;

    int32_t size = fetch_frame();
    if (size <= 0) {
        ef_log_str(EF_WARNING, "crop-check: no frame for this prediction");
        return EF_KEEP;
    }
    int32_t classes = ef_infer(frame, size, (int32_t)crop[0], (int32_t)crop[1], (int32_t)crop[2], (int32_t)crop[3],
                               probabilities, MAX_CLASSES * (int32_t)sizeof(float));
    if (classes == -2) {
        ef_log_str(EF_WARNING, "crop-check: the frame is undecodable or the crop is outside it");
        return EF_KEEP;
    }
    if (classes <= 0) return EF_FAIL; /* not granted, over its calls, too many classes: a fault to see */

    int32_t best = 0;
    for (int32_t k = 1; k < classes; k++)
        if (probabilities[k] > probabilities[best]) best = k;

    ef_buf_clear(&message);
    ef_puts(&message, "{\"frame_id\":");
    ef_put_span(&message, frame_id);
    ef_puts(&message, ",\"index\":");
    ef_put_int(&message, best);
    ef_puts(&message, ",\"score\":");
    ef_put_num(&message, probabilities[best]);
    ef_puts(&message, "}");
    return ef_emit_buf("top1", &message) ? EF_FAIL : EF_KEEP;
}
