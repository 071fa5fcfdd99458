/* PROXY protocol header encoding, byte for byte what forkproxy's proxy_protocol.py sends.
 *
 * v1 text or v2 binary from the client's address (accept4's) and the local one
 * (getsockname of the client socket). Both ends IPv4-mapped (a dual-stack listener's
 * IPv4 client) go out as TCP4; a lone mapped end stays TCP6. IPv6 text is RFC 5952 in
 * hex groups only (never a dotted tail), scope ids dropped. Anything but IP: v1
 * "PROXY UNKNOWN", v2 LOCAL with no address. No TLVs. Pure: no socket calls.
 */
#include "engine.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

static const uint8_t v2_signature[12] = {'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'};
static const uint8_t mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* RFC 5952: lower-case hex groups without leading zeros, the first longest run of two or
 * more zero groups as "::". */
static int ipv6_text(const uint8_t *addr, char *out)
{
    unsigned groups[8];
    for (int i = 0; i < 8; i++)
        groups[i] = (unsigned)addr[2 * i] << 8 | addr[2 * i + 1];
    int best = -1, best_len = 1, run = -1;
    for (int i = 0; i <= 8; i++) {
        if (i < 8 && groups[i] == 0) {
            if (run < 0)
                run = i;
        } else if (run >= 0) {
            if (i - run > best_len) {
                best = run;
                best_len = i - run;
            }
            run = -1;
        }
    }
    char *p = out;
    for (int i = 0; i < 8; i++) {
        if (i == best) {
            *p++ = ':';
            *p++ = ':';
            i += best_len - 1;
            continue;
        }
        if (i > 0 && i != best + best_len)
            *p++ = ':';
        p += sprintf(p, "%x", groups[i]);
    }
    *p = 0;
    return (int)(p - out);
}

struct endpoint {
    int family;        /* AF_INET or AF_INET6 after unmapping, else AF_UNSPEC */
    uint8_t addr[16];
    uint16_t port;
};

static void endpoint_of(const struct sockaddr *sa, struct endpoint *ep)
{
    memset(ep, 0, sizeof *ep);
    ep->family = AF_UNSPEC;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        ep->family = AF_INET;
        memcpy(ep->addr, &in->sin_addr, 4);
        ep->port = ntohs(in->sin_port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        ep->family = AF_INET6;
        memcpy(ep->addr, &in6->sin6_addr, 16);
        ep->port = ntohs(in6->sin6_port);
    }
}

/* The header for `client` -> `local` into `out`; its length, or -1 if it does not fit. */
int proxy_header_encode(int version, const struct sockaddr *client, const struct sockaddr *local,
                        char *out, size_t size)
{
    struct endpoint src, dst;
    endpoint_of(client, &src);
    endpoint_of(local, &dst);
    int family = src.family == dst.family ? src.family : AF_UNSPEC;
    if (family == AF_INET6 && memcmp(src.addr, mapped_prefix, 12) == 0 &&
        memcmp(dst.addr, mapped_prefix, 12) == 0) {
        family = AF_INET;
        memmove(src.addr, src.addr + 12, 4);
        memmove(dst.addr, dst.addr + 12, 4);
    }
    if (version == 1) {
        char a[48], b[48];
        const char *proto;
        if (family == AF_INET) {
            inet_ntop(AF_INET, src.addr, a, sizeof a);
            inet_ntop(AF_INET, dst.addr, b, sizeof b);
            proto = "TCP4";
        } else if (family == AF_INET6) {
            ipv6_text(src.addr, a);
            ipv6_text(dst.addr, b);
            proto = "TCP6";
        } else {
            int n = snprintf(out, size, "PROXY UNKNOWN\r\n");
            return n < 0 || (size_t)n >= size ? -1 : n;
        }
        int n = snprintf(out, size, "PROXY %s %s %s %u %u\r\n", proto, a, b, src.port, dst.port);
        return n < 0 || (size_t)n >= size ? -1 : n;
    }
    uint8_t *p = (uint8_t *)out;
    size_t alen = family == AF_INET ? 4 : family == AF_INET6 ? 16 : 0;
    size_t body = alen ? 2 * alen + 4 : 0;
    if (size < 16 + body)
        return -1;
    memcpy(p, v2_signature, 12);
    p[12] = alen ? 0x21 : 0x20;                          /* v2, PROXY or LOCAL */
    p[13] = family == AF_INET ? 0x11 : family == AF_INET6 ? 0x21 : 0x00; /* TCP over IPv4/6 */
    p[14] = (uint8_t)(body >> 8);
    p[15] = (uint8_t)body;
    if (alen) {
        memcpy(p + 16, src.addr, alen);
        memcpy(p + 16 + alen, dst.addr, alen);
        p[16 + 2 * alen] = (uint8_t)(src.port >> 8);
        p[17 + 2 * alen] = (uint8_t)src.port;
        p[18 + 2 * alen] = (uint8_t)(dst.port >> 8);
        p[19 + 2 * alen] = (uint8_t)dst.port;
    }
    return (int)(16 + body);
}
