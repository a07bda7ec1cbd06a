/* Paced RTP sending off the interpreter: one sender thread per process.
 *
 * Python queues each call's next ~160 ms of packets here (ready-made, or as a run of
 * payload frames this module puts RTP headers on); the thread wakes on absolute 20 ms ticks
 * of CLOCK_MONOTONIC and sends every stream's next packet with sendto on a dup of the call's
 * UDP socket. Neither the sleeping nor the system calls need the GIL, so a busy event loop
 * (received datagrams, in-band DTMF, signalling, the collector) no longer makes ticks late,
 * and the per-packet work a thousand calls do fifty times a second is a few C statements.
 *
 * Each tick is spread over STEPS steps of PTIME/STEPS: stream i sends in step i % STEPS, so
 * a thousand sockets do not burst into the kernel (and the far ends) at one instant.
 * Rings and the stream table are guarded by `lock`; `send_lock` is held while a step's
 * packets go out without `lock`, and close_stream takes it first, so a stream's fd is never
 * closed under a sendto in flight.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RING 128                /* packets per stream: 2.56 s of 20 ms frames */
#define STEPS 10                /* sends of one tick spread over 10 steps of 2 ms */
#define PTIME_NS 20000000LL
#define STEP_NS (PTIME_NS / STEPS)
#define MAX_PACKET 1500
#define MAX_CATCHUP 5           /* overdue ticks sent back to back; older ones skipped */
#define SAMPLES 32768           /* lateness samples kept: ~65 s of steps */
#define DEFAULT_SLOT 192        /* 12-byte header + 160-byte frame + SRTP tag, rounded */

typedef struct {
    int in_use;
    int fd;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    unsigned char *buf; /* RING slots of `slot` bytes */
    uint16_t lens[RING];
    size_t slot;
    unsigned head, count;
    int period; /* ticks between packets (ptime / 20 ms) */
    int phase;  /* ticks until the next packet is due */
    int primed; /* fed since open/flush: running dry is then an underrun */
    uint64_t pushed, sent, underruns, dropped, errors;
} Stream;

typedef struct {
    int fd;
    int sid;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    size_t len;
    unsigned char data[MAX_PACKET];
} Outgoing;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t send_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static Stream *streams;
static Py_ssize_t capacity;
static Py_ssize_t open_count;
static int thread_started;
static int realtime; /* SCHED_FIFO granted */

static Outgoing *batch;
static Py_ssize_t batch_capacity;

static int64_t lateness[SAMPLES];
static uint64_t lateness_n;
static int64_t intervals[SAMPLES];
static uint64_t intervals_n;
static uint64_t ticks, ticks_skipped, ticks_caught_up;
static uint64_t total_sent, total_underruns, total_dropped, total_errors;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(int64_t deadline) {
    struct timespec ts = {.tv_sec = deadline / 1000000000LL, .tv_nsec = deadline % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

/* One step: take the due packet of every stream in this step (under `lock`), then send
 * them (under `send_lock` only) and book the results. */
static void run_step(int step) {
    Py_ssize_t n = 0;
    pthread_mutex_lock(&send_lock);
    pthread_mutex_lock(&lock);
    Py_ssize_t need = capacity / STEPS + 1;
    if (batch_capacity < need) {
        Outgoing *grown = realloc(batch, (size_t)need * sizeof(Outgoing));
        if (grown != NULL) {
            batch = grown;
            batch_capacity = need;
        }
    }
    for (Py_ssize_t i = step; i < capacity && n < batch_capacity; i += STEPS) {
        Stream *s = &streams[i];
        if (!s->in_use) {
            continue;
        }
        if (s->period > 1) {
            if (--s->phase > 0) {
                continue;
            }
            s->phase = s->period;
        }
        if (s->count == 0) {
            if (s->primed) {
                s->primed = 0;
                s->underruns++;
                total_underruns++;
            }
            continue;
        }
        Outgoing *o = &batch[n++];
        o->fd = s->fd;
        o->sid = (int)i;
        o->addr = s->addr;
        o->addrlen = s->addrlen;
        o->len = s->lens[s->head];
        memcpy(o->data, s->buf + (size_t)s->head * s->slot, o->len);
        s->head = (s->head + 1) % RING;
        s->count--;
    }
    pthread_mutex_unlock(&lock);
    for (Py_ssize_t j = 0; j < n; j++) {
        Outgoing *o = &batch[j];
        ssize_t r;
        do {
            r = sendto(o->fd, o->data, o->len, MSG_DONTWAIT, (struct sockaddr *)&o->addr,
                       o->addrlen);
        } while (r < 0 && errno == EINTR);
        o->len = r < 0 ? 0 : 1; /* reused as the outcome */
    }
    pthread_mutex_lock(&lock);
    for (Py_ssize_t j = 0; j < n; j++) {
        Stream *s = &streams[batch[j].sid]; /* still open: closing needs send_lock */
        if (batch[j].len) {
            s->sent++;
            total_sent++;
        } else {
            s->errors++;
            total_errors++;
        }
    }
    pthread_mutex_unlock(&lock);
    pthread_mutex_unlock(&send_lock);
}

static void *sender_main(void *arg) {
    (void)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the interpreter's business */
    struct sched_param param = {.sched_priority = 1};
    /* Low real-time priority when allowed (EPERM otherwise: then plain scheduling). */
    int granted = pthread_setschedparam(pthread_self(), SCHED_FIFO, &param) == 0;
    pthread_mutex_lock(&lock);
    realtime = granted;
    for (;;) {
        while (open_count == 0) {
            pthread_cond_wait(&wake, &lock); /* idle: no wake-ups for nobody */
        }
        pthread_mutex_unlock(&lock);
        int64_t start = now_ns();
        int64_t previous = -1;
        for (uint64_t n = 0;; n++) {
            int64_t tick_at = start + (int64_t)n * PTIME_NS;
            for (int k = 0; k < STEPS; k++) {
                int64_t due = tick_at + k * STEP_NS;
                sleep_until(due);
                int64_t woke = now_ns();
                pthread_mutex_lock(&lock);
                lateness[lateness_n++ % SAMPLES] = woke - due;
                if (k == 0) {
                    if (previous >= 0) {
                        intervals[intervals_n++ % SAMPLES] = woke - previous;
                    }
                    if (woke - due >= PTIME_NS) {
                        ticks_caught_up++;
                    }
                    ticks++;
                }
                pthread_mutex_unlock(&lock);
                if (k == 0) {
                    previous = woke;
                }
                run_step(k);
            }
            int64_t behind = (now_ns() - (start + (int64_t)(n + 1) * PTIME_NS)) / PTIME_NS;
            if (behind >= MAX_CATCHUP) {
                pthread_mutex_lock(&lock);
                ticks_skipped += (uint64_t)(behind - MAX_CATCHUP + 1);
                pthread_mutex_unlock(&lock);
                n += (uint64_t)(behind - MAX_CATCHUP + 1);
            }
            pthread_mutex_lock(&lock);
            int idle = open_count == 0;
            pthread_mutex_unlock(&lock);
            if (idle) {
                break;
            }
        }
        pthread_mutex_lock(&lock);
    }
    return NULL;
}

static void after_fork_child(void) {
    /* Only the forking thread survives: a child starts its own sender when it needs one,
     * and the parent's streams (its calls) are not the child's to send. Their rings are
     * left allocated: freeing here is not safe after a fork. */
    pthread_mutex_init(&lock, NULL);
    pthread_mutex_init(&send_lock, NULL);
    pthread_cond_init(&wake, NULL);
    thread_started = 0;
    for (Py_ssize_t i = 0; i < capacity; i++) {
        if (streams[i].in_use) {
            close(streams[i].fd);
            streams[i].in_use = 0;
        }
    }
    open_count = 0;
}

static int ensure_thread(void) {
    if (thread_started) {
        return 0;
    }
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&thread, &attr, sender_main, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    thread_started = 1;
    return 0;
}

/* The open stream `sid`, with `lock` held; NULL (lock released, exception set) if none. */
static Stream *locked_stream(int sid) {
    pthread_mutex_lock(&lock);
    if (sid < 0 || sid >= capacity || !streams[sid].in_use) {
        pthread_mutex_unlock(&lock);
        PyErr_Format(PyExc_ValueError, "no open stream %d", sid);
        return NULL;
    }
    return &streams[sid];
}

static int parse_address(PyObject *tuple, struct sockaddr_storage *out, socklen_t *len) {
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope_id = 0;
    if (!PyArg_ParseTuple(tuple, "si|II", &host, &port, &flowinfo, &scope_id)) {
        return -1;
    }
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port must be 0..65535");
        return -1;
    }
    memset(out, 0, sizeof(*out));
    struct sockaddr_in *v4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        *len = sizeof(*v4);
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        v6->sin6_flowinfo = htonl(flowinfo);
        v6->sin6_scope_id = scope_id;
        *len = sizeof(*v6);
    } else {
        PyErr_Format(PyExc_ValueError, "not an IP address: %s", host);
        return -1;
    }
    return 0;
}

static PyObject *open_stream(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"fd", "address", "period", NULL};
    int fd, period = 1;
    PyObject *address;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iO!|i", keywords, &fd, &PyTuple_Type,
                                     &address, &period)) {
        return NULL;
    }
    if (period < 1) {
        PyErr_SetString(PyExc_ValueError, "period must be at least one tick");
        return NULL;
    }
    struct sockaddr_storage addr;
    socklen_t addrlen;
    if (parse_address(address, &addr, &addrlen) < 0) {
        return NULL;
    }
    unsigned char *buf = malloc(RING * DEFAULT_SLOT);
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dup < 0) {
        free(buf);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pthread_mutex_lock(&lock);
    if (ensure_thread() < 0) {
        pthread_mutex_unlock(&lock);
        close(dup);
        free(buf);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_ssize_t sid = 0;
    while (sid < capacity && streams[sid].in_use) {
        sid++;
    }
    if (sid == capacity) {
        Py_ssize_t grown_capacity = capacity ? capacity * 2 : 64;
        Stream *grown = realloc(streams, (size_t)grown_capacity * sizeof(Stream));
        if (grown == NULL || grown_capacity > INT32_MAX) {
            pthread_mutex_unlock(&lock);
            close(dup);
            free(buf);
            return PyErr_NoMemory();
        }
        memset(grown + capacity, 0, (size_t)(grown_capacity - capacity) * sizeof(Stream));
        streams = grown;
        capacity = grown_capacity;
    }
    Stream *s = &streams[sid];
    memset(s, 0, sizeof(*s));
    s->in_use = 1;
    s->fd = dup;
    s->addr = addr;
    s->addrlen = addrlen;
    s->buf = buf;
    s->slot = DEFAULT_SLOT;
    s->period = period;
    s->phase = 1;
    open_count++;
    pthread_cond_signal(&wake);
    pthread_mutex_unlock(&lock);
    return PyLong_FromSsize_t(sid);
}

/* Make room for packets of `size` bytes: slots are as wide as the largest packet seen. */
static int widen(Stream *s, size_t size) {
    if (size <= s->slot) {
        return 0;
    }
    size_t slot = (size + 15) & ~(size_t)15;
    unsigned char *buf = malloc(RING * slot);
    if (buf == NULL) {
        return -1;
    }
    uint16_t lens[RING];
    for (unsigned j = 0; j < s->count; j++) {
        unsigned from = (s->head + j) % RING;
        memcpy(buf + (size_t)j * slot, s->buf + (size_t)from * s->slot, s->lens[from]);
        lens[j] = s->lens[from];
    }
    memcpy(s->lens, lens, sizeof(lens));
    free(s->buf);
    s->buf = buf;
    s->slot = slot;
    s->head = 0;
    return 0;
}

static unsigned char *tail_slot(Stream *s) {
    unsigned at = (s->head + s->count) % RING;
    return s->buf + (size_t)at * s->slot;
}

static void append_done(Stream *s, size_t len) {
    s->lens[(s->head + s->count) % RING] = (uint16_t)len;
    s->count++;
    s->pushed++;
    s->primed = 1;
}

static PyObject *push(PyObject *self, PyObject *args) {
    int sid;
    Py_buffer packet;
    if (!PyArg_ParseTuple(args, "iy*", &sid, &packet)) {
        return NULL;
    }
    if (packet.len <= 0 || packet.len > MAX_PACKET) {
        PyBuffer_Release(&packet);
        PyErr_Format(PyExc_ValueError, "packet must be 1..%d bytes", MAX_PACKET);
        return NULL;
    }
    Stream *s = locked_stream(sid);
    if (s == NULL) {
        PyBuffer_Release(&packet);
        return NULL;
    }
    int queued = 0;
    if (widen(s, (size_t)packet.len) < 0) {
        pthread_mutex_unlock(&lock);
        PyBuffer_Release(&packet);
        return PyErr_NoMemory();
    }
    if (s->count < RING) {
        memcpy(tail_slot(s), packet.buf, (size_t)packet.len);
        append_done(s, (size_t)packet.len);
        queued = 1;
    } else {
        s->dropped++;
        total_dropped++;
    }
    pthread_mutex_unlock(&lock);
    PyBuffer_Release(&packet);
    return PyBool_FromLong(queued);
}

static PyObject *push_rtp(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"sid",  "payload",      "frame_size", "sequence_number",
                               "timestamp", "ssrc", "payload_type", "marker",
                               "samples",   NULL};
    int sid, payload_type, marker = 0;
    Py_ssize_t frame_size, samples = -1;
    unsigned long long seq, timestamp, ssrc;
    Py_buffer payload;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iy*nKKKi|pn", keywords, &sid, &payload,
                                     &frame_size, &seq, &timestamp, &ssrc, &payload_type,
                                     &marker, &samples)) {
        return NULL;
    }
    if (frame_size <= 0 || frame_size + 12 > MAX_PACKET || payload.len % frame_size ||
        payload_type < 0 || payload_type > 127) {
        PyBuffer_Release(&payload);
        PyErr_SetString(PyExc_ValueError,
                        "payload must be whole frames of 1..1488 bytes; payload type 0..127");
        return NULL;
    }
    if (samples < 0) {
        samples = frame_size;
    }
    Stream *s = locked_stream(sid);
    if (s == NULL) {
        PyBuffer_Release(&payload);
        return NULL;
    }
    size_t size = (size_t)frame_size + 12;
    if (widen(s, size) < 0) {
        pthread_mutex_unlock(&lock);
        PyBuffer_Release(&payload);
        return PyErr_NoMemory();
    }
    Py_ssize_t frames = payload.len / frame_size, done = 0;
    const unsigned char *from = payload.buf;
    uint32_t ts = (uint32_t)timestamp, id = (uint32_t)ssrc;
    uint16_t sq = (uint16_t)seq;
    for (; done < frames && s->count < RING; done++) {
        unsigned char *p = tail_slot(s);
        p[0] = 0x80;
        p[1] = (unsigned char)(((marker && done == 0) ? 0x80 : 0) | payload_type);
        p[2] = (unsigned char)(sq >> 8);
        p[3] = (unsigned char)sq;
        p[4] = (unsigned char)(ts >> 24);
        p[5] = (unsigned char)(ts >> 16);
        p[6] = (unsigned char)(ts >> 8);
        p[7] = (unsigned char)ts;
        p[8] = (unsigned char)(id >> 24);
        p[9] = (unsigned char)(id >> 16);
        p[10] = (unsigned char)(id >> 8);
        p[11] = (unsigned char)id;
        memcpy(p + 12, from + done * frame_size, (size_t)frame_size);
        append_done(s, size);
        sq++;
        ts += (uint32_t)samples;
    }
    pthread_mutex_unlock(&lock);
    PyBuffer_Release(&payload);
    return PyLong_FromSsize_t(done);
}

static PyObject *flush(PyObject *self, PyObject *args) {
    int sid;
    if (!PyArg_ParseTuple(args, "i", &sid)) {
        return NULL;
    }
    Stream *s = locked_stream(sid);
    if (s == NULL) {
        return NULL;
    }
    unsigned dropped = s->count;
    s->count = 0;
    s->head = 0;
    s->primed = 0;
    s->dropped += dropped;
    total_dropped += dropped;
    pthread_mutex_unlock(&lock);
    return PyLong_FromUnsignedLong(dropped);
}

static PyObject *queued(PyObject *self, PyObject *args) {
    int sid;
    if (!PyArg_ParseTuple(args, "i", &sid)) {
        return NULL;
    }
    Stream *s = locked_stream(sid);
    if (s == NULL) {
        return NULL;
    }
    unsigned count = s->count;
    pthread_mutex_unlock(&lock);
    return PyLong_FromUnsignedLong(count);
}

static PyObject *stream_stats(PyObject *self, PyObject *args) {
    int sid;
    if (!PyArg_ParseTuple(args, "i", &sid)) {
        return NULL;
    }
    Stream *s = locked_stream(sid);
    if (s == NULL) {
        return NULL;
    }
    Stream copy = *s;
    pthread_mutex_unlock(&lock);
    return Py_BuildValue("{sKsKsKsKsKsI}", "pushed", (unsigned long long)copy.pushed, "sent",
                         (unsigned long long)copy.sent, "underruns",
                         (unsigned long long)copy.underruns, "dropped",
                         (unsigned long long)copy.dropped, "errors",
                         (unsigned long long)copy.errors, "queued", copy.count);
}

static PyObject *close_stream(PyObject *self, PyObject *args) {
    int sid;
    if (!PyArg_ParseTuple(args, "i", &sid)) {
        return NULL;
    }
    int found = 0, fd = -1;
    unsigned char *buf = NULL;
    Py_BEGIN_ALLOW_THREADS;
    pthread_mutex_lock(&send_lock); /* no sendto on its fd in flight */
    pthread_mutex_lock(&lock);
    if (sid >= 0 && sid < capacity && streams[sid].in_use) {
        Stream *s = &streams[sid];
        found = 1;
        fd = s->fd;
        buf = s->buf;
        s->dropped += s->count;
        total_dropped += s->count;
        memset(s, 0, sizeof(*s));
        open_count--;
    }
    pthread_mutex_unlock(&lock);
    pthread_mutex_unlock(&send_lock);
    if (found) {
        close(fd);
        free(buf);
    }
    Py_END_ALLOW_THREADS;
    if (!found) {
        PyErr_Format(PyExc_ValueError, "no open stream %d", sid);
        return NULL;
    }
    Py_RETURN_NONE;
}

static int compare(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* {"p50", "p99", "max"} in ms of the kept samples (absolute deviation from `centre`). */
static PyObject *summary(const int64_t *samples, uint64_t total, int64_t centre) {
    size_t n = total < SAMPLES ? (size_t)total : SAMPLES;
    if (n == 0) {
        return Py_BuildValue("{sdsdsd}", "p50", Py_NAN, "p99", Py_NAN, "max", Py_NAN);
    }
    int64_t *sorted = malloc(n * sizeof(int64_t));
    if (sorted == NULL) {
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < n; i++) {
        int64_t v = samples[i] - centre;
        sorted[i] = v < 0 ? -v : v;
    }
    qsort(sorted, n, sizeof(int64_t), compare);
    double p50 = sorted[(n - 1) * 50 / 100] / 1e6;
    double p99 = sorted[(n - 1) * 99 / 100] / 1e6;
    double max = sorted[n - 1] / 1e6;
    free(sorted);
    return Py_BuildValue("{sdsdsd}", "p50", p50, "p99", p99, "max", max);
}

static PyObject *stats(PyObject *self, PyObject *unused) {
    int64_t *late = malloc(sizeof(lateness)), *gaps = malloc(sizeof(intervals));
    if (late == NULL || gaps == NULL) {
        free(late);
        free(gaps);
        return PyErr_NoMemory();
    }
    pthread_mutex_lock(&lock);
    memcpy(late, lateness, sizeof(lateness));
    memcpy(gaps, intervals, sizeof(intervals));
    uint64_t late_n = lateness_n, gaps_n = intervals_n;
    unsigned long long t = ticks, skipped = ticks_skipped, caught_up = ticks_caught_up;
    unsigned long long sent = total_sent, underruns = total_underruns;
    unsigned long long dropped = total_dropped, errors = total_errors;
    Py_ssize_t open = open_count;
    int rt = realtime, running = thread_started;
    pthread_mutex_unlock(&lock);
    PyObject *late_summary = summary(late, late_n, 0);
    PyObject *jitter_summary = summary(gaps, gaps_n, PTIME_NS);
    free(late);
    free(gaps);
    if (late_summary == NULL || jitter_summary == NULL) {
        Py_XDECREF(late_summary);
        Py_XDECREF(jitter_summary);
        return NULL;
    }
    return Py_BuildValue(
        "{sNsNsKsKsKsKsKsKsKsnsOsO}", "lateness_ms", late_summary, "interval_jitter_ms",
        jitter_summary, "ticks", t, "ticks_skipped", skipped, "ticks_caught_up", caught_up,
        "sent", sent, "underruns", underruns, "dropped", dropped, "errors", errors, "streams",
        open, "realtime", rt ? Py_True : Py_False, "running", running ? Py_True : Py_False);
}

static PyObject *reset_stats(PyObject *self, PyObject *unused) {
    pthread_mutex_lock(&lock);
    lateness_n = intervals_n = 0;
    ticks = ticks_skipped = ticks_caught_up = 0;
    total_sent = total_underruns = total_dropped = total_errors = 0;
    pthread_mutex_unlock(&lock);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"open_stream", (PyCFunction)(void (*)(void))open_stream, METH_VARARGS | METH_KEYWORDS,
     "open_stream(fd, address, period=1) -> sid: send to address (host, port) on a dup of fd,"
     " one packet every `period` 20 ms ticks"},
    {"push", push, METH_VARARGS, "push(sid, packet) -> bool: queue one packet (False: full)"},
    {"push_rtp", (PyCFunction)(void (*)(void))push_rtp, METH_VARARGS | METH_KEYWORDS,
     "push_rtp(sid, payload, frame_size, sequence_number, timestamp, ssrc, payload_type,"
     " marker=False, samples=frame_size) -> frames queued: one RTP packet per frame"},
    {"flush", flush, METH_VARARGS, "flush(sid) -> int: drop the queued packets, say how many"},
    {"queued", queued, METH_VARARGS, "queued(sid) -> int: packets waiting"},
    {"stream_stats", stream_stats, METH_VARARGS, "stream_stats(sid) -> dict of counters"},
    {"close_stream", close_stream, METH_VARARGS, "close_stream(sid): drop queued, free slot"},
    {"stats", stats, METH_NOARGS, "stats() -> dict: tick lateness, jitter, counters"},
    {"reset_stats", reset_stats, METH_NOARGS, "reset_stats(): start a new measurement"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rtpsend", "Paced RTP sender thread (see _rtpsend.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rtpsend(void) {
    static int registered;
    if (!registered) {
        pthread_atfork(NULL, NULL, after_fork_child);
        registered = 1;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "RING", RING) < 0 ||
        PyModule_AddIntConstant(m, "STEPS", STEPS) < 0 ||
        PyModule_AddIntConstant(m, "PTIME_MS", (int)(PTIME_NS / 1000000)) < 0 ||
        PyModule_AddIntConstant(m, "MAX_PACKET", MAX_PACKET) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
