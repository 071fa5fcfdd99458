/* Pure functions over bytes the engine reads and writes, each the twin of a Python module
 * that tests compare it with: the PROXY header parser (proxy_header_parse.c, twin of
 * forkproxy/relay/proxy_header.py) and the access-log line (access_log.c, twin of
 * forkproxy/relay/access_log_format.py). No allocation, no system calls, no Python.
 */
#ifndef FORKPROXY_FORMATS_H
#define FORKPROXY_FORMATS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* -- PROXY protocol header parsing (proxy_header_parse.c) -- */

#define PH_V1_MAX_LENGTH 107  /* spec 2.1: the longest line, CRLF included */
#define PH_V1_MIN_LENGTH 15   /* "PROXY UNKNOWN\r\n" */
#define PH_V2_FIXED_LENGTH 16
#define PH_V2_MAX_LENGTH 2048 /* the whole v2 header accepted: 16 + a length up to 2032 */

/* Why a header is refused: the order of proxy_header_reasons[] and of proxy_header.py's
 * REASONS. parse() returns only those before PH_TRUNCATED. */
enum ph_reason {
    PH_BAD_SIGNATURE,
    PH_TOO_LONG,
    PH_BAD_V1_SYNTAX,
    PH_UNKNOWN_FAMILY,
    PH_UNKNOWN_PROTOCOL,
    PH_BAD_ADDRESS,
    PH_BAD_VERSION,
    PH_BAD_COMMAND,
    PH_BAD_LENGTH,
    PH_BAD_TLV,
    PH_TRUNCATED, /* the caller's: EOF before a whole header */
    PH_TIMEOUT,   /* the caller's: no whole header within --accept-proxy-timeout */
    PH_REASONS
};
extern const char *const proxy_header_reasons[PH_REASONS];

enum ph_status { PH_NEED_MORE, PH_HEADER, PH_ERROR };
enum ph_command { PH_LOCAL = 0, PH_PROXY = 1 };

struct ph_result {
    enum ph_status status;
    size_t at_least;        /* PH_NEED_MORE: the header is at least this long */
    enum ph_reason reason;  /* PH_ERROR */
    size_t length;          /* PH_HEADER: the header's bytes; what follows is data */
    int version;            /* 1 or 2 */
    enum ph_command command;
    int family;             /* AF_INET, AF_INET6, AF_UNIX, AF_UNSPEC as on the wire */
    int has_addresses;      /* 0: use the connection's own endpoints */
    struct sockaddr_storage source, destination; /* sockaddr_in or sockaddr_in6 */
};

/* What the `size` bytes received so far at the start of a connection are. */
void proxy_header_parse(const uint8_t *data, size_t size, struct ph_result *result);

/* -- the access-log line (access_log.c) -- */

/* Why a connection ended: the order of access_log_ends[] and of access_log_format.py's
 * END_REASONS. */
enum end_reason {
    END_REASON_CLIENT_CLOSED,
    END_REASON_TARGET_CLOSED,
    END_REASON_CLIENT_RESET,
    END_REASON_TARGET_RESET,
    END_REASON_IDLE_TIMEOUT,
    END_REASON_CONNECT_TIMEOUT,
    END_REASON_CONNECT_FAILED,
    END_REASON_REFUSED_CAP,
    END_REASON_REFUSED_PER_SOURCE,
    END_REASON_NO_TARGET,
    END_REASON_PROXY_HEADER_ERROR,
    END_REASON_STOPPED,
    END_REASON_COUNT
};
extern const char *const access_log_ends[END_REASON_COUNT];

enum access_log_format { ACCESS_LOG_LOGFMT, ACCESS_LOG_JSON };

/* Text fields are UTF-8 (a surrogate code point, as Python's "surrogatepass" writes it, is
 * escaped; an invalid byte is written as \ufffd). */
struct access_record {
    int64_t end_ns;            /* CLOCK_REALTIME at the end */
    const char *listener;
    size_t listener_len;
    const char *client;        /* address:port text */
    size_t client_len;
    const char *target;        /* may be empty */
    size_t target_len;
    int64_t worker;            /* the worker's slot */
    int64_t connect_ns;        /* < 0: no connect was made */
    int64_t duration_ns;       /* < 0 is written as 0 */
    int64_t bytes_from_client;
    int64_t bytes_to_client;
    enum end_reason end;
};

/* Writes the line (newline included) into `out` and returns its length. A length over
 * `size` means it did not fit: `out` then holds a cut line, never to be written. A line
 * takes at most ACCESS_LOG_FIXED + 6 x the text fields' bytes. */
#define ACCESS_LOG_FIXED 320
size_t access_log_format(char *out, size_t size, const struct access_record *record,
                         enum access_log_format format);

#endif
