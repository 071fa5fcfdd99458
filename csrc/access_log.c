/* The access log's line: the twin of forkproxy/relay/access_log_format.py, which documents
 * the format. Both write the same bytes for every record (a differential test).
 *
 * Pure: writes into the caller's buffer, allocates nothing, makes no system call, so a
 * worker formats into one per-worker buffer and hands the line to a single write(2).
 */
#include "engine.h"

#include <string.h>

const char *const access_log_ends[END_REASON_COUNT] = {
    "client-closed",   "target-closed",   "client-reset",       "target-reset",
    "idle-timeout",    "connect-timeout", "connect-failed",     "refused-cap",
    "refused-per-source", "no-target",    "proxy-header-error", "stopped",
};

/* Output that counts what it could not store, so the caller learns the length needed. */
struct out {
    char *p;
    size_t size, len;
};

static void put(struct out *o, const char *s, size_t n)
{
    if (o->len < o->size)
        memcpy(o->p + o->len, s, n < o->size - o->len ? n : o->size - o->len);
    o->len += n;
}

static void puts_(struct out *o, const char *s) { put(o, s, strlen(s)); }

static void put_int(struct out *o, int64_t value)
{
    char text[24], *p = text + sizeof text;
    uint64_t magnitude = value < 0 ? 0 - (uint64_t)value : (uint64_t)value;
    do {
        *--p = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude != 0);
    if (value < 0)
        *--p = '-';
    put(o, p, (size_t)(text + sizeof text - p));
}

/* `value` (0 <= value < 10^digits) in exactly `digits` digits */
static void put_digits(struct out *o, int64_t value, int digits)
{
    char text[4];
    for (int i = digits - 1; i >= 0; i--) {
        text[i] = (char)('0' + value % 10);
        value /= 10;
    }
    put(o, text, (size_t)digits);
}

/* The code point of the UTF-8 sequence at s[0..n), its length in *used; -1 for an invalid
 * byte (used = 1). Surrogates (ED A0..BF xx) are decoded: Python's "surrogatepass". */
static long decode(const unsigned char *s, size_t n, size_t *used)
{
    unsigned char c = s[0];
    *used = 1;
    if (c < 0x80)
        return c;
    size_t len;
    long cp;
    unsigned char low = 0x80, high = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        cp = c & 0x0F;
        if (c == 0xE0)
            low = 0xA0;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        cp = c & 0x07;
        if (c == 0xF0)
            low = 0x90;
        if (c == 0xF4)
            high = 0x8F;
    } else {
        return -1;
    }
    if (n < len || s[1] < low || s[1] > high)
        return -1;
    for (size_t i = 1; i < len; i++) {
        if (i > 1 && (s[i] < 0x80 || s[i] > 0xBF))
            return -1;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    *used = len;
    return cp;
}

static int needs_escape(long cp)
{
    return cp < 0x20 || cp == '"' || cp == '\\' || (cp >= 0x7F && cp <= 0x9F) ||
           (cp >= 0xD800 && cp <= 0xDFFF);
}

static int needs_quotes(long cp)
{
    return cp <= 0x20 || cp == '"' || cp == '=' || (cp >= 0x7F && cp <= 0x9F) ||
           (cp >= 0xD800 && cp <= 0xDFFF);
}

static void put_quoted(struct out *o, const char *text, size_t n)
{
    const unsigned char *s = (const unsigned char *)text;
    put(o, "\"", 1);
    for (size_t i = 0; i < n;) {
        size_t used;
        long cp = decode(s + i, n - i, &used);
        if (!needs_escape(cp)) {
            put(o, text + i, used);
        } else if (cp == '"' || cp == '\\') {
            put(o, cp == '"' ? "\\\"" : "\\\\", 2);
        } else if (cp == '\n' || cp == '\r' || cp == '\t') {
            put(o, cp == '\n' ? "\\n" : cp == '\r' ? "\\r" : "\\t", 2);
        } else {
            static const char hex[] = "0123456789abcdef";
            unsigned long u = cp < 0 ? 0xFFFD : (unsigned long)cp;
            char escape[6] = {'\\', 'u', hex[u >> 12 & 0xF], hex[u >> 8 & 0xF], hex[u >> 4 & 0xF],
                              hex[u & 0xF]};
            put(o, escape, 6);
        }
        i += used;
    }
    put(o, "\"", 1);
}

static void put_logfmt_value(struct out *o, const char *text, size_t n)
{
    const unsigned char *s = (const unsigned char *)text;
    for (size_t i = 0; i < n;) {
        size_t used;
        if (needs_quotes(decode(s + i, n - i, &used)))
            return put_quoted(o, text, n);
        i += used;
    }
    put(o, text, n);
}

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

/* ISO 8601 UTC with milliseconds; the civil date from days since the epoch as in
 * H. Hinnant's "chrono-compatible low-level date algorithms" (the Python twin's steps). */
static void put_time(struct out *o, int64_t end_ns)
{
    int64_t ms = floor_div(end_ns, 1000000);
    int64_t seconds = floor_div(ms, 1000), days = floor_div(seconds, 86400);
    int64_t millis = ms - seconds * 1000, second_of_day = seconds - days * 86400;
    int64_t z = days + 719468;
    int64_t era = floor_div(z, 146097);
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int64_t day = doy - (153 * mp + 2) / 5 + 1;
    int64_t month = mp < 10 ? mp + 3 : mp - 9;
    int64_t year = yoe + era * 400 + (month <= 2);
    put_digits(o, year, 4);
    put(o, "-", 1);
    put_digits(o, month, 2);
    put(o, "-", 1);
    put_digits(o, day, 2);
    put(o, "T", 1);
    put_digits(o, second_of_day / 3600, 2);
    put(o, ":", 1);
    put_digits(o, second_of_day / 60 % 60, 2);
    put(o, ":", 1);
    put_digits(o, second_of_day % 60, 2);
    put(o, ".", 1);
    put_digits(o, millis, 3);
    put(o, "Z", 1);
}

static void put_ms(struct out *o, int64_t ns)
{
    int64_t us = (ns > 0 ? ns : 0) / 1000;
    put_int(o, us / 1000);
    put(o, ".", 1);
    put_digits(o, us % 1000, 3);
}

size_t access_log_format(char *out, size_t size, const struct access_record *r,
                         enum access_log_format format)
{
    struct out o = {.p = out, .size = size, .len = 0};
    const char *end = (unsigned)r->end < END_REASON_COUNT ? access_log_ends[r->end] : "";
    int json = format == ACCESS_LOG_JSON;
    void (*text)(struct out *, const char *, size_t) = json ? put_quoted : put_logfmt_value;
    const char *quote = json ? "\"" : "";
    puts_(&o, json ? "{\"time\":\"" : "time=");
    put_time(&o, r->end_ns);
    puts_(&o, quote);
    puts_(&o, json ? ",\"listener\":" : " listener=");
    text(&o, r->listener, r->listener_len);
    puts_(&o, json ? ",\"client\":" : " client=");
    text(&o, r->client, r->client_len);
    puts_(&o, json ? ",\"target\":" : " target=");
    text(&o, r->target, r->target_len);
    puts_(&o, json ? ",\"worker\":" : " worker=");
    put_int(&o, r->worker);
    puts_(&o, json ? ",\"connect_ms\":" : " connect_ms=");
    if (r->connect_ns >= 0)
        put_ms(&o, r->connect_ns);
    else if (json)
        puts_(&o, "null");
    puts_(&o, json ? ",\"duration_ms\":" : " duration_ms=");
    put_ms(&o, r->duration_ns);
    puts_(&o, json ? ",\"bytes_from_client\":" : " bytes_from_client=");
    put_int(&o, r->bytes_from_client);
    puts_(&o, json ? ",\"bytes_to_client\":" : " bytes_to_client=");
    put_int(&o, r->bytes_to_client);
    puts_(&o, json ? ",\"end\":" : " end=");
    text(&o, end, strlen(end));
    puts_(&o, json ? "}\n" : "\n");
    return o.len;
}
