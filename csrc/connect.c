/* Connecting an admitted client to a target of its route, with failover.
 *
 * As the Python reference (targets.py, target_connect.py, connecting.py): a route of one
 * target connects to it; a route of several tries them healthy-first in this worker's
 * round-robin order, then those cooling down, soonest back first; a target that fails
 * cools down for COOLDOWN. Any error between socket(2) and a connected socket fails that
 * address (the next is tried, then the next target). Failures of this machine (out of
 * descriptors or memory) try no other target: EMFILE/ENFILE keep the client and retry
 * once accepting resumes. A host-name target is resolved by hooks.resolve on every
 * connection and each address tried in turn. The route's --connect-timeout applies to
 * each step (resolving, each address).
 *
 * A route whose targets have rows in the shared target table (a worker's: balance.py) picks
 * by it instead: targets the checks found down are left out, the usable ones come first
 * (round-robin from the route's shared word, or in the order given for --balance first),
 * then those cooling down, soonest back first; a failed attempt cools its target down for
 * every worker and is counted in its row by reason, a connect that succeeds ends it.
 *
 * A connect in progress is done at its first writable edge (no SO_ERROR unless the edge
 * carries an error, no second connect); the socket stays registered for the relay.
 */
#include "engine.h"

#include <arpa/inet.h>
#include <net/if.h>
#include <stdio.h>
#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/un.h>
#include <unistd.h>


static void try_next_target(engine *e, conn *c);

/* An address as settings/address.py's format_sockaddr writes it (1.2.3.4:80, [::1]:80,
 * [fe80::1%eth0]:80, /path, @name, unix-client), as bytes: a unix name is copied as it is,
 * the formatter escapes what is not UTF-8. Returns its length. */
size_t address_text(char *out, size_t size, const struct sockaddr *sa, socklen_t len)
{
    char host[INET6_ADDRSTRLEN];
    int n = -1;
    if (len >= sizeof(struct sockaddr_in) && sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        n = snprintf(out, size, "%s:%u", host, (unsigned)ntohs(in->sin_port));
    } else if (len >= sizeof(struct sockaddr_in6) && sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        char scope[IF_NAMESIZE + 12] = "";
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        if (in6->sin6_scope_id && if_indextoname(in6->sin6_scope_id, scope + 1) != NULL)
            scope[0] = '%';
        else if (in6->sin6_scope_id)
            snprintf(scope, sizeof scope, "%%%u", (unsigned)in6->sin6_scope_id);
        n = snprintf(out, size, "[%s%s]:%u", host, scope, (unsigned)ntohs(in6->sin6_port));
    } else if (sa->sa_family == AF_UNIX && len > offsetof(struct sockaddr_un, sun_path)) {
        const char *name = ((const struct sockaddr_un *)sa)->sun_path;
        size_t count = len - offsetof(struct sockaddr_un, sun_path);
        if (name[0] == 0) { /* abstract: @name */
            if (count <= size) {
                out[0] = '@';
                memcpy(out + 1, name + 1, count - 1);
                return count;
            }
        } else {
            count = strnlen(name, count);
            if (count > 0 && count <= size) {
                memcpy(out, name, count);
                return count;
            }
        }
    }
    if (n < 0 || (size_t)n >= size)
        n = snprintf(out, size, "unix-client");
    return (size_t)n;
}

/* The same as a str (a unix name's bytes that are not UTF-8 backslash-escaped). */
PyObject *sockaddr_text(const struct sockaddr *sa, socklen_t len)
{
    char text[ADDRESS_TEXT_MAX];
    size_t n = address_text(text, sizeof text, sa, len);
    return PyUnicode_DecodeUTF8(text, (Py_ssize_t)n, "backslashreplace");
}

/* Failures of this machine, not of a target: no cool-down, no other target tried. */
bool local_errno(int error)
{
    return error == EMFILE || error == ENFILE || error == ENOBUFS || error == ENOMEM;
}

/* The target table's words of a target (relaxed atomics: any process writes them). */
static bool target_up(engine *e, const struct target *t)
{
    return __atomic_load_n(table_word(e, t->row, e->lay.target_up), __ATOMIC_RELAXED) != 0;
}
static int64_t *cooldown_word(engine *e, const struct target *t)
{
    return table_word(e, t->row, e->lay.target_cooldown_until_ns);
}
static int64_t cooldown_until(engine *e, const struct target *t)
{
    return __atomic_load_n(cooldown_word(e, t), __ATOMIC_RELAXED);
}

/* The index in CONNECT_ERROR_REASONS of a failed connect's errno (connect_error_reason). */
static int error_reason(int error)
{
    switch (error) {
    case ECONNREFUSED:
    case ENOENT: /* no unix socket file */
        return CE_REFUSED;
    case ETIMEDOUT:
        return CE_TIMEOUT;
    case ENETUNREACH:
    case EHOSTUNREACH:
    case EHOSTDOWN:
    case ENETDOWN:
        return CE_UNREACHABLE;
    default:
        return CE_OTHER;
    }
}

/* A failed attempt at a target with a row: its row's reason and the slot's CONNECT_ERRORS. */
static void count_attempt_error(engine *e, const struct target *t, int error)
{
    size_t row = target_row(e, t->row);
    if (row)
        slot_add(e, row + e->lay.target_connect_errors + 8 * (size_t)error_reason(error), 1);
    slot_add(e, e->lay.connect_errors, 1);
}

static void reverse(uint16_t *a, int n)
{
    for (int i = 0, j = n - 1; i < j; i++, j--) {
        uint16_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

/* balance.py's Balancer.order without backups: the usable targets (round-robin from the
 * route's shared word, or as given for `first`), then the others not down, soonest back
 * first. No step at all when every target is down. */
static void build_shared_order(engine *e, conn *c)
{
    struct group *g = c->route->group;
    int n = g->count;
    if (n == 1) {
        c->steps = target_up(e, &g->targets[0]) ? 1 : 0;
        return;
    }
    c->order = PyMem_Malloc(sizeof *c->order * (size_t)n);
    if (c->order == NULL) {
        c->steps = 1; /* no memory: try the first only */
        return;
    }
    int usable = 0, cooling = 0;
    uint16_t *cool = c->order + n; /* cooling ones fill from the end, then sorted */
    for (int i = 0; i < n; i++) {
        const struct target *t = &g->targets[i];
        if (!target_up(e, t))
            continue;
        if (cooldown_until(e, t) <= e->now_ns)
            c->order[usable++] = (uint16_t)i;
        else
            *--cool = (uint16_t)i, cooling++;
    }
    if (!g->first && usable > 1) {
        uint64_t turn = g->turn >= 0 ? (uint64_t)__atomic_fetch_add(
                                           (int64_t *)(e->base + e->lay.round_robin +
                                                       8 * (size_t)g->turn),
                                           1, __ATOMIC_RELAXED)
                                     : g->next++;
        int start = (int)(turn % (uint64_t)usable);
        reverse(c->order, start); /* rotate left by start */
        reverse(c->order + start, usable - start);
        reverse(c->order, usable);
    }
    /* cool[0..cooling) is in reverse order: in order, then a stable sort by end of
     * cool-down (insertion sort: routes are short), right after the usable ones. */
    reverse(cool, cooling);
    for (int i = 1; i < cooling; i++) {
        uint16_t v = cool[i];
        int64_t until = cooldown_until(e, &g->targets[v]);
        int j = i - 1;
        while (j >= 0 && cooldown_until(e, &g->targets[cool[j]]) > until) {
            cool[j + 1] = cool[j];
            j--;
        }
        cool[j + 1] = v;
    }
    memmove(c->order + usable, cool, sizeof *cool * (size_t)cooling);
    c->steps = (uint16_t)(usable + cooling);
}

/* targets.py's TargetGroup.order, this worker's view: `g`'s targets from its round-robin
 * start, healthy ones first, then those cooling down, soonest back first. Fills
 * order[0..count) (count > 1) and returns count. */
int group_local_order(engine *e, struct group *r, uint16_t *order)
{
    int n = r->count;
    unsigned start = r->next;
    r->next = (start + 1) % (unsigned)n;
    int healthy = 0, cooling = 0;
    uint16_t *cool = order + n; /* cooling ones fill from the end, then sorted */
    for (int i = 0; i < n; i++) {
        int index = (int)((start + (unsigned)i) % (unsigned)n);
        if (r->targets[index].cooling_until_ns <= e->now_ns)
            order[healthy++] = (uint16_t)index;
        else
            *--cool = (uint16_t)index, cooling++;
    }
    /* cool[0..cooling) holds them in reverse rotation order: put them in rotation order,
     * then a stable sort by end of cool-down (insertion sort: routes are short). */
    reverse(cool, cooling);
    for (int i = 1; i < cooling; i++) {
        uint16_t v = cool[i];
        int j = i - 1;
        while (j >= 0 && r->targets[cool[j]].cooling_until_ns > r->targets[v].cooling_until_ns) {
            cool[j + 1] = cool[j];
            j--;
        }
        cool[j + 1] = v;
    }
    return n;
}

static void build_order(engine *e, conn *c)
{
    if (c->route->group->shared) {
        build_shared_order(e, c);
        return;
    }
    struct group *r = c->route->group;
    int n = r->count;
    c->steps = (uint16_t)n;
    if (n == 1)
        return;
    c->order = PyMem_Malloc(sizeof *c->order * (size_t)n);
    if (c->order == NULL) {
        c->steps = 1; /* no memory: try the first only */
        return;
    }
    group_local_order(e, r, c->order);
}

void connect_start(engine *e, conn *c)
{
    build_order(e, c);
    c->step = 0;
    try_next_target(e, c);
}

static void fail_client(engine *e, conn *c, int error)
{
    c->end = c->no_address         ? END_REASON_NO_TARGET
             : error == ETIMEDOUT ? END_REASON_CONNECT_TIMEOUT
                                  : END_REASON_CONNECT_FAILED;
    if (!c->route->group->shared) /* else each failed attempt was counted */
        slot_add(e, e->lay.connect_errors, 1);
    count_refusal(e, c->listener, L_NO_TARGET);
    event_report(e, EVENT_CONNECT_FAILED, error, c->route->index, &c->peer.sa, c->peerlen, NULL);
    /* ECONNRESET: the target accepted, then aborted before the connect was seen done; the
     * client gets the abort too (connecting.py does the same). */
    conn_close(e, c, error == ECONNRESET ? END_ABORT : END_NORMAL, error);
}

static void drop_target_socket(conn *c)
{
    if (c->target_fd >= 0) {
        close(c->target_fd); /* also leaves the epoll */
        c->target_fd = -1;
    }
    c->ts = (struct sock_state){0};
}

static void connected(engine *e, conn *c)
{
    list_del(&c->timed);
    struct group *g = c->route->group;
    struct target *t = &g->targets[c->target];
    if (g->shared) {
        int64_t *word = cooldown_word(e, t);
        if (__atomic_load_n(word, __ATOMIC_RELAXED))
            __atomic_store_n(word, 0, __ATOMIC_RELAXED);
    } else if (g->count > 1) {
        t->cooling_until_ns = 0;
    }
    PyMem_Free(c->order);
    c->order = NULL;
    PyMem_Free(c->addrs);
    c->addrs = NULL;
    observe(e, &e->connect_hist, e->now_ns - c->started_ns);
    c->connected_ns = e->now_ns;
    int version = c->route->proxy_protocol;
    if (version) {
        char header[PROXY_HEADER_MAX];
        union {
            struct sockaddr sa;
            struct sockaddr_storage ss;
        } local = {.sa = {.sa_family = AF_UNSPEC}};
        socklen_t locallen = sizeof local;
        int family = c->peerlen ? c->peer.sa.sa_family : AF_UNSPEC;
        if ((family == AF_INET || family == AF_INET6) &&
            getsockname(c->client_fd, &local.sa, &locallen) < 0)
            local.sa.sa_family = AF_UNSPEC;
        const struct sockaddr *client = &c->peer.sa;
        struct sockaddr unspec = {.sa_family = AF_UNSPEC};
        if (!c->peerlen || local.sa.sa_family != family)
            client = &unspec;
        int len = proxy_header_encode(version, client, &local.sa, header, sizeof header);
        ssize_t sent = len < 0 ? -1 : send(c->target_fd, header, (size_t)len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent != len) {
            /* nginx takes the header from its first read only: a short send is fatal. */
            int error = sent < 0 ? errno : EMSGSIZE;
            if (g->shared) /* a failed attempt at that target, as balance.py counts it */
                count_attempt_error(e, t, error);
            drop_target_socket(c);
            fail_client(e, c, error);
            return;
        }
    }
    size_t row = g->shared ? target_row(e, t->row) : 0;
    if (row) { /* open in its row until conn_close */
        slot_add(e, row + e->lay.target_connections, 1);
        slot_add(e, row + e->lay.target_active, 1);
        c->target_row = row;
        c->to_target.row_counter = row + e->lay.target_bytes_to_target;
        c->to_client.row_counter = row + e->lay.target_bytes_to_client;
    }
    relay_start(e, c);
}

static void retry_later(engine *e, conn *c, int error)
{
    event_report(e, EVENT_CONNECT_PAUSED, error, c->route->index, &c->peer.sa, c->peerlen, NULL);
    /* Out of descriptors: keep the client, leave the others in the backlog, try this
     * target again once accepting resumes. */
    c->state = CONN_RETRY_WAIT;
    c->step--;
    list_del(&c->timed);
    list_add_tail(&e->retryq, &c->queued);
    if (e->accepting) {
        listeners_unregister(e);
        e->accepting = false;
    }
    if (!e->accept_resume_ns)
        e->accept_resume_ns = e->now_ns + 500000000;
}

/* The target being tried has failed this client with `error`. */
static void target_failed(engine *e, conn *c, int error)
{
    c->error = error;
    c->no_address = c->resolve_failing; /* a name without an address, as NoAddress */
    c->resolve_failing = false;
    if ((error == EMFILE || error == ENFILE) && !e->draining) {
        retry_later(e, c, error);
        return;
    }
    struct group *g = c->route->group;
    if (local_errno(error)) {
        if (g->shared && error != EMFILE && error != ENFILE) /* those are retried, uncounted */
            count_attempt_error(e, &g->targets[c->target], error);
        list_del(&c->timed);
        fail_client(e, c, error);
        return;
    }
    if (g->shared) {
        struct target *t = &g->targets[c->target];
        count_attempt_error(e, t, error);
        int64_t *word = cooldown_word(e, t);
        bool newly = __atomic_load_n(word, __ATOMIC_RELAXED) <= e->now_ns;
        __atomic_store_n(word, e->now_ns + COOLDOWN_NS, __ATOMIC_RELAXED);
        /* With one target the client's own failure says it all: no event of its own. */
        if (newly && g->count > 1)
            event_report(e, EVENT_TARGET_FAILED, error, c->route->index, NULL, 0, t->object);
    } else if (g->count > 1) {
        struct target *t = &g->targets[c->target];
        bool newly = t->cooling_until_ns <= e->now_ns;
        t->cooling_until_ns = e->now_ns + COOLDOWN_NS;
        if (newly)
            event_report(e, EVENT_TARGET_FAILED, error, c->route->index, NULL, 0, t->object);
    }
    try_next_target(e, c);
}

/* 0 connected, 1 in progress, else an errno. */
static int try_address(engine *e, conn *c, const struct sockaddr *sa, socklen_t len)
{
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return errno;
    if (sa->sa_family == AF_INET || sa->sa_family == AF_INET6) {
        int one = 1; /* recv must never skip an urgent byte (relay.c, copy_small) */
        if (e->copy_size && setsockopt(fd, SOL_SOCKET, SO_OOBINLINE, &one, sizeof one) < 0) {
            int error = errno;
            close(fd);
            return error;
        }
        const struct route *r = c->route;
        for (int i = 0; i < r->noptions; i++) {
            const int *opt = r->options[i];
            if (setsockopt(fd, opt[0], opt[1], &opt[2], sizeof opt[2]) < 0) {
                int error = errno;
                close(fd);
                return error;
            }
        }
    }
    int rc = connect(fd, sa, len);
    int error = rc == 0 ? 0 : errno;
    if (rc < 0 && error != EINPROGRESS) {
        close(fd);
        return error;
    }
    if (epoll_add(e, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET, &c->wtarget) < 0) {
        error = errno;
        close(fd);
        return error;
    }
    c->target_fd = fd;
    c->ts.oobinline = e->copy_size && (sa->sa_family == AF_INET || sa->sa_family == AF_INET6);
    return rc == 0 ? 0 : 1;
}

/* The next address of the current target, or the next target once none is left. */
static void try_addresses(engine *e, conn *c)
{
    struct target *t = &c->route->group->targets[c->target];
    struct sockaddr_storage numeric;
    for (;;) {
        const struct sockaddr *sa;
        socklen_t len;
        if (t->family != 0) {
            if (c->next_addr > 0)
                break;
            int error = target_address(t, &numeric);
            if (error) {
                c->next_addr++;
                c->error = error;
                break;
            }
            sa = (const struct sockaddr *)&numeric;
            len = t->addrlen;
        } else {
            if (c->next_addr >= c->naddrs)
                break;
            sa = (const struct sockaddr *)&c->addrs[c->next_addr];
            len = sa->sa_family == AF_INET ? sizeof(struct sockaddr_in)
                  : sa->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                              : sizeof(struct sockaddr_un);
        }
        c->next_addr++;
        int rc = try_address(e, c, sa, len);
        if (rc == 0) {
            c->ts.writable = true;
            connected(e, c);
            return;
        }
        if (rc == 1) {
            e->connects_begun = true;
            c->state = CONN_CONNECTING;
            c->deadline_ns = e->now_ns + c->route->connect_timeout_ns;
            list_del(&c->timed);
            if (c->route->connect_timeout_ns)
                list_add_tail(&c->route->connecting, &c->timed);
            return;
        }
        c->error = rc;
        if (local_errno(rc))
            break;
    }
    PyMem_Free(c->addrs);
    c->addrs = NULL;
    c->naddrs = 0;
    target_failed(e, c, c->error ? c->error : EHOSTUNREACH);
}

static void try_next_target(engine *e, conn *c)
{
    if (c->step >= c->steps) {
        list_del(&c->timed);
        if (!c->error)
            c->no_address = true; /* no target to try: every one is down */
        fail_client(e, c, c->error ? c->error : EHOSTUNREACH);
        return;
    }
    c->target = c->order ? c->order[c->step] : 0;
    c->step++;
    c->next_addr = 0;
    struct target *t = &c->route->group->targets[c->target];
    if (t->family == 0) {
        c->state = CONN_RESOLVING;
        c->token = ++e->next_token;
        c->resolve_asked = false;
        c->deadline_ns = e->now_ns + c->route->connect_timeout_ns;
        list_del(&c->timed);
        if (c->route->connect_timeout_ns)
            list_add_tail(&c->route->connecting, &c->timed);
        list_add_tail(&e->resolveq, &c->queued); /* asked after the batch (module.c) */
        return;
    }
    try_addresses(e, c);
}

void connect_on_target_event(engine *e, conn *c, uint32_t events)
{
    if (events & (EPOLLERR | EPOLLHUP)) {
        int error = 0;
        socklen_t len = sizeof error;
        if (getsockopt(c->target_fd, SOL_SOCKET, SO_ERROR, &error, &len) < 0 || error == 0)
            error = ECONNREFUSED;
        drop_target_socket(c);
        c->error = error;
        try_addresses(e, c);
        return;
    }
    if (!(events & EPOLLOUT))
        return;
    c->ts.writable = true;
    c->ts.readable = (events & (EPOLLIN | EPOLLRDHUP)) != 0;
    c->ts.urgent = (events & EPOLLPRI) != 0;
    connected(e, c);
}

void connect_resolved(engine *e, conn *c, struct sockaddr_storage *addrs, int count)
{
    list_del(&c->queued);
    c->token = 0;
    c->addrs = addrs;
    c->naddrs = count;
    c->next_addr = 0;
    c->error = EHOSTUNREACH;
    try_addresses(e, c);
}

void connect_resolve_failed(engine *e, conn *c, int error)
{
    list_del(&c->queued);
    list_del(&c->timed);
    c->token = 0;
    c->resolve_failing = true;
    target_failed(e, c, error ? error : EHOSTUNREACH);
}

void connect_expire(engine *e, struct route *r, int64_t now)
{
    while (!list_empty(&r->connecting)) {
        conn *c = container_of(r->connecting.next, conn, timed);
        if (c->deadline_ns > now)
            break;
        list_del(&c->timed);
        if (c->state == CONN_RESOLVING) {
            list_del(&c->queued);
            c->token = 0; /* a late answer finds no one */
            target_failed(e, c, ETIMEDOUT);
        } else {
            drop_target_socket(c);
            c->error = ETIMEDOUT;
            try_addresses(e, c);
        }
    }
}

void connect_retry_waiting(engine *e)
{
    while (!list_empty(&e->retryq)) {
        conn *c = container_of(e->retryq.next, conn, queued);
        list_del(&c->queued);
        try_next_target(e, c);
    }
}

void connect_cancel(engine *e, conn *c)
{
    (void)e;
    list_del(&c->timed);
    if (c->state == CONN_RESOLVING || c->state == CONN_RETRY_WAIT)
        list_del(&c->queued);
    c->token = 0;
}
