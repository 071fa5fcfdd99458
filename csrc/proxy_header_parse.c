/* PROXY protocol header parsing for --accept-proxy: the twin of
 * forkproxy/relay/proxy_header.py, which documents what is accepted and why. Both give the
 * same result for every input, checked by a differential test; keep the order of the
 * checks identical, since it decides which error a broken header gets.
 *
 * Pure: no allocation, no system calls. Every byte is checked as it arrives, so a header
 * arriving a byte at a time parses as a whole one does.
 */
#include "engine.h"

#include <arpa/inet.h>
#include <string.h>

const char *const proxy_header_reasons[PH_REASONS] = {
    "bad-signature", "too-long",    "bad-v1-syntax", "unknown-family",
    "unknown-protocol", "bad-address", "bad-version",   "bad-command",
    "bad-length",    "bad-tlv",     "truncated",     "timeout",
};

static const uint8_t v2_signature[12] = {'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'};
static const uint8_t v1_signature[6] = {'P', 'R', 'O', 'X', 'Y', ' '};
/* address bytes by v2 family nibble, when the protocol is given too */
static const size_t v2_address_length[4] = {0, 12, 36, 216};
static const int v2_family[4] = {AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX};

static void need(struct ph_result *r, size_t at_least)
{
    r->status = PH_NEED_MORE;
    r->at_least = at_least;
}

static void fail(struct ph_result *r, enum ph_reason reason)
{
    r->status = PH_ERROR;
    r->reason = reason;
}

static void found(struct ph_result *r, int version, enum ph_command command, int family,
                  size_t length)
{
    r->status = PH_HEADER;
    r->version = version;
    r->command = command;
    r->family = family;
    r->length = length;
}

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

/* A decimal number of 1 to `most` digits without a leading zero, or -1. */
static long decimal(const uint8_t *p, size_t n, size_t most)
{
    if (n == 0 || n > most || (p[0] == '0' && n > 1))
        return -1;
    long value = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        value = value * 10 + (p[i] - '0');
    }
    return value;
}

static long port_of(const uint8_t *p, size_t n)
{
    long value = decimal(p, n, 5);
    return value <= 0xFFFF ? value : -1;
}

static int ipv4_of(const uint8_t *p, size_t n, uint8_t out[4])
{
    size_t start = 0;
    int part = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && p[i] != '.')
            continue;
        if (part == 4)
            return -1;
        long octet = decimal(p + start, i - start, 3);
        if (octet < 0 || octet > 255)
            return -1;
        out[part++] = (uint8_t)octet;
        start = i + 1;
    }
    return part == 4 ? 0 : -1;
}

static int hex_value(uint8_t c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The groups of one side of "::" (or of a whole address without it) into words; their
 * count, or -1. A dotted IPv4 tail is allowed as the last part if `tail`. */
static int ipv6_half(const uint8_t *p, size_t n, int tail, unsigned words[8])
{
    if (n == 0)
        return 0;
    int count = 0;
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && p[i] != ':')
            continue;
        size_t len = i - start;
        int hex = len > 0 && len <= 4;
        unsigned word = 0;
        for (size_t j = 0; hex && j < len; j++) {
            int v = hex_value(p[start + j]);
            if (v < 0)
                hex = 0;
            word = word << 4 | (unsigned)v;
        }
        if (hex) {
            if (count == 8)
                return -1;
            words[count++] = word;
        } else if (tail && i == n) {
            uint8_t quad[4];
            if (ipv4_of(p + start, len, quad) < 0 || count > 6)
                return -1;
            words[count++] = (unsigned)quad[0] << 8 | quad[1];
            words[count++] = (unsigned)quad[2] << 8 | quad[3];
        } else {
            return -1;
        }
        start = i + 1;
    }
    return count;
}

static int ipv6_of(const uint8_t *p, size_t n, uint8_t out[16])
{
    const uint8_t *gap = NULL;
    for (size_t i = 0; i + 1 < n; i++) {
        if (p[i] == ':' && p[i + 1] == ':') {
            if (gap != NULL)
                return -1; /* a second "::" */
            gap = p + i;
            i++;
        }
    }
    unsigned head[8], tail[8], words[8] = {0};
    int heads, tails = 0;
    if (gap == NULL) {
        heads = ipv6_half(p, n, 1, head);
        if (heads != 8)
            return -1;
    } else {
        heads = ipv6_half(p, (size_t)(gap - p), 0, head);
        tails = ipv6_half(gap + 2, n - (size_t)(gap - p) - 2, 1, tail);
        if (heads < 0 || tails < 0 || heads + tails > 7)
            return -1;
    }
    for (int i = 0; i < heads; i++)
        words[i] = head[i];
    for (int i = 0; i < tails; i++)
        words[8 - tails + i] = tail[i];
    for (int i = 0; i < 8; i++) {
        out[2 * i] = (uint8_t)(words[i] >> 8);
        out[2 * i + 1] = (uint8_t)words[i];
    }
    return 0;
}

static void set_address(struct sockaddr_storage *ss, int family, const uint8_t *addr,
                        unsigned port)
{
    memset(ss, 0, sizeof *ss);
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)ss;
        in->sin_family = AF_INET;
        memcpy(&in->sin_addr, addr, 4);
        in->sin_port = htons((uint16_t)port);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
        in6->sin6_family = AF_INET6;
        memcpy(&in6->sin6_addr, addr, 16);
        in6->sin6_port = htons((uint16_t)port);
    }
}

/* The line between "PROXY " and the CRLF. */
static void parse_v1_line(const uint8_t *line, size_t n, size_t length, struct ph_result *r)
{
    const uint8_t *field[5] = {NULL};
    size_t len[5] = {0};
    int fields = 0;
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && line[i] != ' ')
            continue;
        if (fields < 5) {
            field[fields] = line + start;
            len[fields] = i - start;
        }
        fields++;
        start = i + 1;
        if (fields == 1 && len[0] == 7 && memcmp(field[0], "UNKNOWN", 7) == 0) {
            found(r, 1, PH_PROXY, AF_UNSPEC, length); /* the rest is to be ignored */
            return;
        }
    }
    int family;
    if (len[0] == 4 && memcmp(field[0], "TCP4", 4) == 0)
        family = AF_INET;
    else if (len[0] == 4 && memcmp(field[0], "TCP6", 4) == 0)
        family = AF_INET6;
    else if (len[0] > 0)
        return fail(r, PH_UNKNOWN_FAMILY);
    else
        return fail(r, PH_BAD_V1_SYNTAX);
    if (fields != 5)
        return fail(r, PH_BAD_V1_SYNTAX);
    for (int i = 1; i < 5; i++)
        if (len[i] == 0)
            return fail(r, PH_BAD_V1_SYNTAX);
    uint8_t source[16], destination[16];
    int bad = family == AF_INET
                  ? ipv4_of(field[1], len[1], source) < 0 || ipv4_of(field[2], len[2], destination) < 0
                  : ipv6_of(field[1], len[1], source) < 0 || ipv6_of(field[2], len[2], destination) < 0;
    long source_port = port_of(field[3], len[3]), destination_port = port_of(field[4], len[4]);
    if (bad || source_port < 0 || destination_port < 0)
        return fail(r, PH_BAD_ADDRESS);
    found(r, 1, PH_PROXY, family, length);
    r->has_addresses = 1;
    set_address(&r->source, family, source, (unsigned)source_port);
    set_address(&r->destination, family, destination, (unsigned)destination_port);
}

static void parse_v1(const uint8_t *data, size_t size, struct ph_result *r)
{
    if (memcmp(data, v1_signature, min_size(size, 6)) != 0)
        return fail(r, PH_BAD_SIGNATURE);
    size_t limit = min_size(size, PH_V1_MAX_LENGTH);
    for (size_t i = 6; i < limit; i++) {
        if (data[i] == '\n')
            return fail(r, PH_BAD_V1_SYNTAX); /* a lone LF */
        if (data[i] != '\r')
            continue;
        if (i + 1 >= limit)
            break;
        if (data[i + 1] != '\n')
            return fail(r, PH_BAD_V1_SYNTAX); /* a lone CR */
        return parse_v1_line(data + 6, i - 6, i + 2, r);
    }
    /* No CRLF yet: it must end by byte PH_V1_MAX_LENGTH. */
    if (size >= PH_V1_MAX_LENGTH)
        return fail(r, PH_TOO_LONG);
    need(r, size + 1 > PH_V1_MIN_LENGTH ? size + 1 : PH_V1_MIN_LENGTH);
}

static void parse_v2(const uint8_t *data, size_t size, struct ph_result *r)
{
    if (memcmp(data, v2_signature, min_size(size, 12)) != 0)
        return fail(r, PH_BAD_SIGNATURE);
    if (size <= 12)
        return need(r, PH_V2_FIXED_LENGTH);
    unsigned command = data[12] & 0xF;
    if (data[12] >> 4 != 2)
        return fail(r, PH_BAD_VERSION);
    if (command > 1)
        return fail(r, PH_BAD_COMMAND);
    if (size <= 13)
        return need(r, PH_V2_FIXED_LENGTH);
    unsigned family = data[13] >> 4, protocol = data[13] & 0xF;
    if (command == PH_PROXY) {
        if (family > 3)
            return fail(r, PH_UNKNOWN_FAMILY);
        if (protocol > 2)
            return fail(r, PH_UNKNOWN_PROTOCOL);
    }
    if (size < PH_V2_FIXED_LENGTH)
        return need(r, PH_V2_FIXED_LENGTH);
    size_t length = PH_V2_FIXED_LENGTH + ((size_t)data[14] << 8 | data[15]);
    if (length > PH_V2_MAX_LENGTH)
        return fail(r, PH_TOO_LONG);
    /* The address layout is known only for PROXY with both family and protocol given. */
    int layout_known = command == PH_PROXY && family != 0 && protocol != 0;
    size_t addresses_end = PH_V2_FIXED_LENGTH + (layout_known ? v2_address_length[family] : 0);
    if (addresses_end > length)
        return fail(r, PH_BAD_LENGTH);
    if (size < length)
        return need(r, length);
    if (layout_known) {
        size_t offset = addresses_end;
        while (offset < length) {
            if (length - offset < 3)
                return fail(r, PH_BAD_TLV);
            offset += 3 + ((size_t)data[offset + 1] << 8 | data[offset + 2]);
        }
        if (offset != length)
            return fail(r, PH_BAD_TLV);
    }
    if (command == PH_LOCAL)
        return found(r, 2, PH_LOCAL, AF_UNSPEC, length);
    found(r, 2, PH_PROXY, v2_family[family], length);
    const uint8_t *a = data + PH_V2_FIXED_LENGTH;
    if (data[13] == 0x11) {
        r->has_addresses = 1;
        set_address(&r->source, AF_INET, a, (unsigned)a[8] << 8 | a[9]);
        set_address(&r->destination, AF_INET, a + 4, (unsigned)a[10] << 8 | a[11]);
    } else if (data[13] == 0x21) {
        r->has_addresses = 1;
        set_address(&r->source, AF_INET6, a, (unsigned)a[32] << 8 | a[33]);
        set_address(&r->destination, AF_INET6, a + 16, (unsigned)a[34] << 8 | a[35]);
    }
}

void proxy_header_parse(const uint8_t *data, size_t size, struct ph_result *result)
{
    result->has_addresses = 0;
    if (size == 0)
        return need(result, PH_V1_MIN_LENGTH);
    if (data[0] == '\r')
        return parse_v2(data, size, result);
    parse_v1(data, size, result);
}
