/* --access-log in the engine: a line per connection when it ends, with one write(2).
 *
 * The twin of forkproxy/relay/access_log.py's ListenerLog and Trail: the same fields and
 * end reasons, formatted by access_log.c (the twin of access_log_format.py) into one
 * per-engine buffer. The files are the worker's (AccessLogFiles opens them, and reopens
 * them on SIGUSR1 at the same descriptor numbers), so the engine only writes: a line the
 * file cannot take at once (ENOSPC, EIO, EAGAIN on a pipe or the journal's socket) is
 * dropped and counted in the slot's ACCESS_LOG_DROPPED, never waited for.
 */
#include "engine.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void write_line(engine *e, const struct listener *l, struct access_record *r)
{
    r->end_ns = realtime_ns();
    r->listener = l->log_name;
    r->listener_len = l->log_name_len;
    r->worker = (int64_t)e->slot_index;
    size_t n = access_log_format(e->logbuf, e->logbuf_size, r, l->log_format);
    ssize_t written = -1;
    if (n <= e->logbuf_size)
        written = l->log_sock ? send(l->log_fd, e->logbuf, n, MSG_DONTWAIT | MSG_NOSIGNAL)
                              : write(l->log_fd, e->logbuf, n);
    if (written != (ssize_t)n)
        slot_add(e, e->lay.access_log_dropped, 1);
}

/* Why a connection ends when nothing said so before it closed. */
static enum end_reason end_of(const conn *c)
{
    if (c->end >= 0)
        return (enum end_reason)c->end;
    if (c->counted_relay)
        return c->end_by_client ? END_REASON_CLIENT_RESET : END_REASON_TARGET_RESET;
    return END_REASON_CONNECT_FAILED;
}

/* `c` ends: its line, before its sockets close (a host-name target's address is read
 * from its socket). */
void access_log_conn(engine *e, conn *c)
{
    const struct listener *l = c->listener;
    if (l->log_fd < 0)
        return;
    char client[ADDRESS_TEXT_MAX], resolved[ADDRESS_TEXT_MAX];
    struct access_record r = {0};
    r.client = client;
    r.client_len = address_text(client, sizeof client, &c->peer.sa, c->peerlen);
    r.connect_ns = -1;
    r.target = "";
    if (c->connected_ns) {
        r.connect_ns = c->connected_ns - c->started_ns;
        const struct target *t = &c->route->group->targets[c->target];
        if (t->family != 0) {
            r.target = t->text;
            r.target_len = t->text_len;
        } else {
            struct sockaddr_storage peer;
            socklen_t len = sizeof peer;
            if (c->target_fd >= 0 && getpeername(c->target_fd, (struct sockaddr *)&peer, &len) == 0) {
                r.target = resolved;
                r.target_len = address_text(resolved, sizeof resolved, (struct sockaddr *)&peer, len);
            }
        }
    }
    r.duration_ns = monotonic_ns() - c->started_ns;
    r.bytes_from_client = (int64_t)c->to_target.moved;
    r.bytes_to_client = (int64_t)c->to_client.moved;
    r.end = end_of(c);
    write_line(e, l, &r);
}

/* A client closed at accept (refused at a cap, or held until the graceful timeout). */
void access_log_refused(engine *e, const struct listener *l, const struct sockaddr *peer,
                        socklen_t peerlen, enum end_reason end)
{
    if (l->log_fd < 0)
        return;
    char client[ADDRESS_TEXT_MAX];
    struct access_record r = {0};
    r.client = client;
    r.client_len = address_text(client, sizeof client, peer, peerlen);
    r.target = "";
    r.connect_ns = -1;
    r.end = end;
    write_line(e, l, &r);
}

/* The line buffer, sized for the longest names this engine writes; whether each log is a
 * socket. */
int access_log_setup(engine *e)
{
    size_t longest = ADDRESS_TEXT_MAX;
    bool any = false;
    for (int i = 0; i < e->nlisteners; i++) {
        struct listener *l = &e->listeners[i];
        if (l->log_fd < 0)
            continue;
        any = true;
        struct stat st;
        l->log_sock = fstat(l->log_fd, &st) == 0 && S_ISSOCK(st.st_mode);
        if (l->log_name_len > longest)
            longest = l->log_name_len;
        const struct group *g = e->routes[l->route].group;
        for (int t = 0; t < g->count; t++)
            if (g->targets[t].text_len > longest)
                longest = g->targets[t].text_len;
    }
    if (!any)
        return 0;
    e->logbuf_size = ACCESS_LOG_FIXED + 6 * 3 * longest; /* 6x each of three text fields */
    e->logbuf = PyMem_Malloc(e->logbuf_size);
    if (e->logbuf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}
