/* night-alert: alerts when a person-like class appears between from_hour and to_hour, local time.
 *
 * Config (all strings, docs/plugins.md):
 *   classes         comma-separated label substrings, matched case-sensitively (ImageNet has no
 *                   "person": clothing classes stand in for one, and "Cardigan" is a corgi while
 *                   "cardigan" is a sweater)
 *   min_score       a class counts from this score on (default 0.3)
 *   from_hour       the window's first hour, 0-23 (default 22)
 *   to_hour         the hour the window ends, 0-24 (default 6); the window is [from, to) on a
 *                   24-hour clock and wraps past midnight when to < from (22 -> 6); 0 -> 24 is all day
 *   utc_offset_min  local time = UTC + this many minutes (default 0)
 *
 * When it fires it emits {"camera","frame_id","label","score","at_ms"} on suffix "alerts" and keeps
 * the prediction (an alert is news about the frame, not a change to it).
 */
#include "edgefleet_plugin.h"

#define MAX_CLASSES 64
#define MAX_LABEL (4 * 4096) /* a label is at most 4096 characters (MAX_STR), 4 bytes each in UTF-8 */

static char classes_text[2048] = "suit,jersey,sweatshirt,cardigan,lab coat,trench coat,bow tie,military uniform,"
                                 "groom,scuba diver,ballplayer";
static const char *classes[MAX_CLASSES];
static size_t class_count;
static double min_score = 0.3;
static int64_t from_hour = 22, to_hour = 6, utc_offset_min = 0;

static char label[MAX_LABEL + 1];
static ef_buf alert;

/* Splits classes_text in place at commas, trimming spaces; empty entries are ignored. */
static int split_classes(void) {
    class_count = 0;
    char *p = classes_text;
    while (*p) {
        char *end = strchr(p, ',');
        char *next = end ? end + 1 : p + strlen(p);
        if (end) *end = '\0';
        while (*p == ' ') p++;
        for (char *q = p + strlen(p); q > p && q[-1] == ' '; q--) q[-1] = '\0';
        if (*p) {
            if (class_count == MAX_CLASSES) return -1;
            classes[class_count++] = p;
        }
        p = next;
    }
    return class_count ? 0 : -1;
}

static int refuse(const char *why) {
    ef_log_str(EF_ERROR, why);
    return 1;
}

/* Reads an integer config value in [lo, hi]; a missing key keeps the default. */
static int config_int(ef_span config, const char *key, int64_t lo, int64_t hi, int64_t *out) {
    char text[32];
    ef_span v = ef_get(config, key);
    if (!v.p) return 0;
    if (ef_str(v, text, sizeof text) < 0 || ef_parse_int(text, out) || *out < lo || *out > hi) return -1;
    return 0;
}

EF_EXPORT(edgefleet_init) int32_t edgefleet_init(const char *json, int32_t len) {
    ef_span config = ef_span_of(json, (size_t)len);
    if (!config.p || config.p[0] != '{') return refuse("night-alert: the config is not a JSON object");
    ef_span v = ef_get(config, "classes");
    if (v.p && ef_str(v, classes_text, sizeof classes_text) < 0) return refuse("night-alert: 'classes' is too long");
    if (split_classes()) return refuse("night-alert: 'classes' needs 1-64 comma-separated names");
    char text[32];
    v = ef_get(config, "min_score");
    if (v.p && (ef_str(v, text, sizeof text) < 0 || ef_parse_num(text, &min_score) || min_score < 0 || min_score > 1))
        return refuse("night-alert: 'min_score' must be a number from 0 to 1");
    if (config_int(config, "from_hour", 0, 23, &from_hour)) return refuse("night-alert: 'from_hour' must be 0-23");
    if (config_int(config, "to_hour", 0, 24, &to_hour)) return refuse("night-alert: 'to_hour' must be 0-24");
    if (config_int(config, "utc_offset_min", -1440, 1440, &utc_offset_min))
        return refuse("night-alert: 'utc_offset_min' must be -1440..1440");
    return 0;
}

static int in_window(int64_t now_ms) {
    int64_t minutes = now_ms / 60000 + utc_offset_min;
    int64_t hour = ((minutes / 60) % 24 + 24) % 24;
    if (from_hour <= to_hour) return hour >= from_hour && hour < to_hour;
    return hour >= from_hour || hour < to_hour;
}

/* A plain search: labels and names are a few dozen bytes, where libc's strstr spends more setting
 * up its tables than searching (it dominated the fuel of a 1000-class prediction). */
static int contains(const char *text, const char *name) {
    size_t n = strlen(name);
    for (; *text; text++)
        if (*text == *name && strncmp(text, name, n) == 0) return 1;
    return 0;
}

static int person_like(const char *text) {
    for (size_t k = 0; k < class_count; k++)
        if (contains(text, classes[k])) return 1;
    return 0;
}

EF_EXPORT(edgefleet_on_prediction) int64_t edgefleet_on_prediction(const char *json, int32_t len) {
    if (!class_count && split_classes()) return EF_FAIL; /* no edgefleet_init call: the defaults */
    int64_t now = ef_now_ms();
    if (!in_window(now)) return EF_KEEP;

    ef_span prediction = ef_span_of(json, (size_t)len);
    ef_span camera = ef_get(prediction, "camera"), frame_id = ef_get(prediction, "frame_id");
    if (!ef_is_string(camera) || !ef_is_string(frame_id)) return EF_FAIL;

    /* The best-scoring person-like class, whatever order the classes come in. */
    ef_iter top = ef_iter_of(ef_get(prediction, "top"));
    ef_span item, best_label = {NULL, 0};
    double best = -1;
    while (ef_next(&top, &item)) {
        double score;
        ef_span name = ef_get(item, "label");
        if (ef_str(name, label, sizeof label) < 0) return EF_FAIL;
        if (!person_like(label)) continue; /* first: reading a number costs more than a label */
        if (ef_num(ef_get(item, "score"), &score)) return EF_FAIL;
        if (score >= min_score && score > best) {
            best = score;
            best_label = name;
        }
    }
    if (top.failed) return EF_FAIL;
    if (!best_label.p) return EF_KEEP;

    ef_buf_clear(&alert);
    ef_puts(&alert, "{\"camera\":");
    ef_put_span(&alert, camera);
    ef_puts(&alert, ",\"frame_id\":");
    ef_put_span(&alert, frame_id);
    ef_puts(&alert, ",\"label\":");
    ef_put_span(&alert, best_label);
    ef_puts(&alert, ",\"score\":");
    ef_put_num(&alert, best);
    ef_puts(&alert, ",\"at_ms\":");
    ef_put_int(&alert, now);
    ef_puts(&alert, "}");
    int32_t sent = ef_emit_buf("alerts", &alert);
    if (sent == -2) ef_log_str(EF_WARNING, "night-alert: alert over the plugin's emit limits, not sent");
    else if (sent) return EF_FAIL;
    return EF_KEEP;
}
