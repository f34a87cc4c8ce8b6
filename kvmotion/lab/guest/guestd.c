/*
 * guestd: the kvmotion lab guest program.
 *
 * A single static process inside the lab guest. It serves a line protocol on TCP (one request
 * line in, one response line out, both '\n' terminated), dirties memory at a chosen rate and
 * working set, and appends sequence-numbered, flushed records to the raw data disk /dev/vda.
 * The host-side tools (kvmotion/lab/guestclient.py, kvmotion/lab/records.py) speak to it and
 * check its disk; docs/guest.md describes the protocol and the record format.
 *
 * Build: gcc -O2 -Wall -Wextra -static -pthread -o guestd guestd.c
 * Usage: guestd [-p PORT] [-d DISK] [-r READY_LINE]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define MIB (1024ull * 1024ull)
#define PAGES_PER_MIB ((size_t)(MIB / PAGE))
#define LINE_MAX_LEN 1024
#define RESP_MAX 8192
#define MAX_CONNS 512
#define SLICE_NS 10000000ull /* dirtier and sampler pacing: 10 ms */
#define RING 512             /* dirtier rate samples (>= 1 s of 10 ms slices) */
#define REC_SIZE 4096u
#define REC_MAGIC "KVMREC01"
#define VERIFY_BATCH 64u

/* ------------------------------------------------------------------------------------------ */
/* clocks and small helpers */

static uint64_t clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t mono_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
static uint64_t real_ns(void) { return clock_ns(CLOCK_REALTIME); }

static void sleep_until(uint64_t mono_deadline) {
    struct timespec ts;
    ts.tv_sec = (time_t)(mono_deadline / 1000000000ull);
    ts.tv_nsec = (long)(mono_deadline % 1000000000ull);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static void sleep_ms(uint64_t ms) { sleep_until(mono_ns() + ms * 1000000ull); }

static uint64_t g_responses; /* global response counter, atomic */
static int g_port = 7000;
static const char *g_disk_path = "/dev/vda";

static void put_u64le(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u32le(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_u64le(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static uint32_t get_u32le(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* CRC-32 (IEEE 802.3, reflected, as zlib.crc32) */
static uint32_t crc_table[256];

static void crc32_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_buf(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* ------------------------------------------------------------------------------------------ */
/* response building */

struct resp {
    char buf[RESP_MAX];
    size_t len;
};

static void resp_add(struct resp *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void resp_add(struct resp *r, const char *fmt, ...) {
    if (r->len >= sizeof r->buf - 2) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(r->buf + r->len, sizeof r->buf - 2 - r->len, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    r->len += (size_t)n;
    if (r->len > sizeof r->buf - 2) r->len = sizeof r->buf - 2;
}

static void resp_ok(struct resp *r) {
    uint64_t n = __atomic_add_fetch(&g_responses, 1, __ATOMIC_SEQ_CST);
    r->len = 0;
    resp_add(r, "OK n=%llu t=%llu rt=%llu", (unsigned long long)n,
             (unsigned long long)mono_ns(), (unsigned long long)real_ns());
}

static void resp_err(struct resp *r, const char *reason) {
    __atomic_add_fetch(&g_responses, 1, __ATOMIC_SEQ_CST);
    r->len = 0;
    resp_add(r, "ERR %s", reason);
}

static int send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* memory dirtier */

struct sample {
    uint64_t t;
    uint64_t pages;
};

static pthread_mutex_t dirty_lock = PTHREAD_MUTEX_INITIALIZER; /* config, buffer, thread */
static unsigned char *dirty_buf;
static size_t dirty_pages_n;  /* pages in the working set */
static unsigned dirty_rate;   /* MiB/s, 0 = as fast as possible */
static int dirty_running;     /* thread exists */
static int dirty_stop_flag;   /* atomic */
static pthread_t dirty_thread;
static uint64_t dirty_pages_total; /* atomic: pages written since guestd start */
static uint64_t dirty_buf_writes;  /* atomic: increments made in the current buffer */

static pthread_mutex_t ring_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sample ring[RING];
static unsigned ring_head; /* next slot */
static unsigned ring_count;

static void ring_push(uint64_t t, uint64_t pages) {
    pthread_mutex_lock(&ring_lock);
    ring[ring_head].t = t;
    ring[ring_head].pages = pages;
    ring_head = (ring_head + 1) % RING;
    if (ring_count < RING) ring_count++;
    pthread_mutex_unlock(&ring_lock);
}

/* pages per second over (about) the last second */
static double ring_rate_pages(uint64_t now, uint64_t pages_now) {
    double rate = 0.0;
    pthread_mutex_lock(&ring_lock);
    if (ring_count > 0) {
        /* walk back from the newest sample to the newest one at least 1 s old (or the oldest) */
        struct sample base = ring[(ring_head + RING - 1) % RING];
        for (unsigned i = 1; i <= ring_count; i++) {
            base = ring[(ring_head + RING - i) % RING];
            if (now - base.t >= 1000000000ull) break;
        }
        uint64_t span = now - base.t;
        if (span > 0 && pages_now >= base.pages)
            rate = (double)(pages_now - base.pages) * 1e9 / (double)span;
    }
    pthread_mutex_unlock(&ring_lock);
    return rate;
}

static void *dirty_main(void *arg) {
    (void)arg;
    const uint64_t npages = dirty_pages_n;
    unsigned char *buf = dirty_buf;
    const double per_ns = (double)dirty_rate * (double)MIB / PAGE / 1e9; /* pages per ns */
    uint64_t cursor = 0;
    uint64_t start = mono_ns();
    uint64_t done = 0; /* pages written by this run */
    uint64_t next = start + SLICE_NS;
    ring_push(start, __atomic_load_n(&dirty_pages_total, __ATOMIC_RELAXED));
    while (!__atomic_load_n(&dirty_stop_flag, __ATOMIC_RELAXED)) {
        uint64_t todo;
        if (dirty_rate == 0) {
            todo = 4096; /* as fast as possible, in chunks so stop and stats stay responsive */
        } else {
            uint64_t now = mono_ns();
            uint64_t due = (uint64_t)((double)(now - start) * per_ns);
            todo = due > done ? due - done : 0;
            /* after a stall (e.g. a paused VM), do not burst: at most two slices of catch-up */
            uint64_t cap = (uint64_t)(per_ns * 2.0 * SLICE_NS) + 1;
            if (todo > cap) {
                done += todo - cap;
                todo = cap;
            }
        }
        for (uint64_t i = 0; i < todo; i++) {
            uint64_t *word = (uint64_t *)(buf + cursor * PAGE);
            word[0]++; /* a changing write in every page */
            cursor++;
            if (cursor == npages) cursor = 0;
        }
        done += todo;
        uint64_t total = __atomic_add_fetch(&dirty_pages_total, todo, __ATOMIC_RELAXED);
        __atomic_add_fetch(&dirty_buf_writes, todo, __ATOMIC_RELAXED);
        uint64_t now = mono_ns();
        if (dirty_rate == 0) {
            if (now >= next) {
                ring_push(now, total);
                next = now + SLICE_NS;
            }
        } else {
            ring_push(now, total);
            if (next < now) next = now;
            sleep_until(next);
            next += SLICE_NS;
        }
    }
    ring_push(mono_ns(), __atomic_load_n(&dirty_pages_total, __ATOMIC_RELAXED));
    return NULL;
}

/* caller holds dirty_lock */
static void dirty_stop_locked(void) {
    if (!dirty_running) return;
    __atomic_store_n(&dirty_stop_flag, 1, __ATOMIC_SEQ_CST);
    pthread_join(dirty_thread, NULL);
    dirty_running = 0;
}

static long meminfo_kib(const char *key) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return -1;
    char line[256];
    long v = -1;
    size_t klen = strlen(key);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
            v = strtol(line + klen + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return v;
}

/* caller holds dirty_lock; returns NULL or an error reason */
static const char *dirty_alloc_locked(size_t wss_mib) {
    size_t npages = wss_mib * PAGES_PER_MIB;
    if (npages == dirty_pages_n && dirty_buf) return NULL;
    long avail = meminfo_kib("MemAvailable");
    long have = avail + (long)(dirty_pages_n * (PAGE / 1024));
    if (avail >= 0 && (long)(wss_mib * 1024) + 16 * 1024 > have) return "wss exceeds available memory";
    free(dirty_buf);
    dirty_buf = NULL;
    dirty_pages_n = 0;
    void *p = NULL;
    if (posix_memalign(&p, PAGE, npages * PAGE) != 0) return "out of memory";
    /* touch every page with a deterministic pattern so CHECKSUM is reproducible */
    unsigned char *b = p;
    for (size_t i = 0; i < npages; i++) {
        memset(b + i * PAGE, 0, PAGE);
        ((uint64_t *)(b + i * PAGE))[1] = i;
    }
    dirty_buf = b;
    dirty_pages_n = npages;
    __atomic_store_n(&dirty_buf_writes, 0, __ATOMIC_RELAXED);
    return NULL;
}

/* Stops the writer, then checks that memory holds every write it made: each page still names
 * its index, and the pages' counters add up to the increments made (a write lost by a migration
 * leaves the sum short). */
static void dirty_verify(struct resp *r) {
    pthread_mutex_lock(&dirty_lock);
    dirty_stop_locked();
    uint64_t sum = 0, misplaced = 0;
    for (size_t i = 0; i < dirty_pages_n; i++) {
        const uint64_t *word = (const uint64_t *)(dirty_buf + i * PAGE);
        sum += word[0];
        if (word[1] != i) misplaced++;
    }
    uint64_t writes = __atomic_load_n(&dirty_buf_writes, __ATOMIC_RELAXED);
    size_t pages = dirty_pages_n;
    pthread_mutex_unlock(&dirty_lock);
    resp_ok(r);
    resp_add(r, " intact=%d writes=%llu sum=%llu misplaced=%llu pages=%zu",
             sum == writes && misplaced == 0, (unsigned long long)writes,
             (unsigned long long)sum, (unsigned long long)misplaced, pages);
}

static void cmd_dirty(struct resp *r, char *args) {
    char *a1 = strtok_r(args, " ", &args);
    char *a2 = strtok_r(NULL, " ", &args);
    char *extra = strtok_r(NULL, " ", &args);
    int stop = 0;
    unsigned long rate = 0, wss = 0;
    if (a1 && strcasecmp(a1, "STOP") == 0 && !a2) {
        stop = 1;
    } else if (a1 && strcasecmp(a1, "VERIFY") == 0 && !a2) {
        dirty_verify(r);
        return;
    } else {
        char *e1 = NULL, *e2 = NULL;
        if (!a1 || !a2 || extra) {
            resp_err(r, "usage: DIRTY <mib_per_s> <working_set_mib> | DIRTY STOP | DIRTY VERIFY");
            return;
        }
        rate = strtoul(a1, &e1, 10);
        wss = strtoul(a2, &e2, 10);
        if (*a1 == '-' || *a2 == '-' || *e1 || *e2 || rate > 1000000 || wss > 1048576) {
            resp_err(r, "bad number: DIRTY <mib_per_s 0..1000000> <working_set_mib 0..1048576>");
            return;
        }
        if (wss == 0) stop = 1;
    }
    pthread_mutex_lock(&dirty_lock);
    dirty_stop_locked();
    if (!stop) {
        const char *err = dirty_alloc_locked(wss);
        if (err) {
            pthread_mutex_unlock(&dirty_lock);
            resp_err(r, err);
            return;
        }
        dirty_rate = (unsigned)rate;
        __atomic_store_n(&dirty_stop_flag, 0, __ATOMIC_SEQ_CST);
        if (pthread_create(&dirty_thread, NULL, dirty_main, NULL) != 0) {
            pthread_mutex_unlock(&dirty_lock);
            resp_err(r, "cannot start dirtier thread");
            return;
        }
        dirty_running = 1;
    }
    resp_ok(r);
    resp_add(r, " rate=%u wss=%zu running=%d", stop ? 0u : dirty_rate,
             dirty_pages_n / PAGES_PER_MIB, dirty_running);
    pthread_mutex_unlock(&dirty_lock);
}

static void cmd_dirtystat(struct resp *r) {
    pthread_mutex_lock(&dirty_lock);
    int running = dirty_running;
    unsigned target = running ? dirty_rate : 0;
    size_t wss = dirty_pages_n / PAGES_PER_MIB;
    pthread_mutex_unlock(&dirty_lock);
    uint64_t now = mono_ns();
    uint64_t pages = __atomic_load_n(&dirty_pages_total, __ATOMIC_RELAXED);
    double rate = ring_rate_pages(now, pages) * PAGE / (double)MIB;
    resp_ok(r);
    resp_add(r, " pages=%llu rate=%.2f target=%u wss=%zu running=%d", (unsigned long long)pages,
             rate, target, wss, running);
}

static void cmd_checksum(struct resp *r) {
    /* FNV-1a 64 over the working set read as little-endian 64-bit words */
    uint64_t h = 0xcbf29ce484222325ull;
    pthread_mutex_lock(&dirty_lock); /* keeps the buffer alive; the dirtier may still run */
    size_t nwords = dirty_pages_n * (PAGE / 8);
    const uint64_t *w = (const uint64_t *)dirty_buf;
    for (size_t i = 0; i < nwords; i++) {
        h ^= __atomic_load_n(&w[i], __ATOMIC_RELAXED);
        h *= 0x100000001b3ull;
    }
    size_t wss = dirty_pages_n / PAGES_PER_MIB;
    int running = dirty_running;
    pthread_mutex_unlock(&dirty_lock);
    resp_ok(r);
    resp_add(r, " sum=%016llx wss=%zu running=%d", (unsigned long long)h, wss, running);
}

/* ------------------------------------------------------------------------------------------ */
/* disk records */

static pthread_mutex_t disk_lock = PTHREAD_MUTEX_INITIALIZER; /* config and thread */
static int disk_running;     /* thread exists */
static int disk_stop_flag;   /* atomic */
static pthread_t disk_thread;
static unsigned disk_interval_ms;
static uint64_t disk_acked;  /* atomic: last acknowledged seq */
static uint64_t disk_errors; /* atomic */
static int disk_last_errno;  /* atomic */
static int disk_full;        /* atomic: stopped at the end of the disk */
static uint64_t disk_size;   /* bytes, set at DISK START */
static int disk_fd = -1;
static int disk_direct;      /* fd opened with O_DIRECT */

static void record_fill(unsigned char *rec, uint64_t seq, uint64_t rt) {
    memcpy(rec, REC_MAGIC, 8);
    put_u64le(rec + 8, seq);
    put_u64le(rec + 16, rt);
    put_u32le(rec + 24, 0); /* crc, computed with this field zero */
    put_u32le(rec + 28, 0); /* reserved */
    for (unsigned j = 0; j < (REC_SIZE - 32) / 8; j++)
        put_u64le(rec + 32 + 8 * j, seq * 0x9E3779B97F4A7C15ull + j);
    put_u32le(rec + 24, crc32_buf(rec, REC_SIZE));
}

/* 0 = valid record with this seq */
static int record_check(unsigned char *rec, uint64_t seq) {
    if (memcmp(rec, REC_MAGIC, 8) != 0) return -1;
    if (get_u64le(rec + 8) != seq) return -1;
    uint32_t crc = get_u32le(rec + 24);
    put_u32le(rec + 24, 0);
    uint32_t calc = crc32_buf(rec, REC_SIZE);
    put_u32le(rec + 24, crc);
    return calc == crc ? 0 : -1;
}

static int disk_open(int flags_extra, int *direct) {
    int fd = open(g_disk_path, O_RDWR | O_DIRECT | flags_extra | O_CLOEXEC);
    *direct = 1;
    if (fd < 0 && errno == EINVAL) {
        fd = open(g_disk_path, O_RDWR | flags_extra | O_CLOEXEC);
        *direct = 0;
    }
    return fd;
}

static uint64_t fd_size(int fd) {
    uint64_t size = 0;
    struct stat st;
    if (ioctl(fd, BLKGETSIZE64, &size) == 0) return size;
    if (fstat(fd, &st) == 0) return (uint64_t)st.st_size;
    return 0;
}

static void *disk_main(void *arg) {
    (void)arg;
    void *mem = NULL;
    if (posix_memalign(&mem, PAGE, REC_SIZE) != 0) return NULL;
    unsigned char *rec = mem;
    while (!__atomic_load_n(&disk_stop_flag, __ATOMIC_RELAXED)) {
        uint64_t seq = __atomic_load_n(&disk_acked, __ATOMIC_SEQ_CST) + 1;
        uint64_t off = (seq - 1) * REC_SIZE;
        if (off + REC_SIZE > disk_size) {
            __atomic_store_n(&disk_full, 1, __ATOMIC_SEQ_CST);
            break;
        }
        record_fill(rec, seq, real_ns());
        ssize_t w = pwrite(disk_fd, rec, REC_SIZE, (off_t)off);
        int ok = w == (ssize_t)REC_SIZE;
        if (ok && !disk_direct) ok = fdatasync(disk_fd) == 0;
        if (!ok) {
            __atomic_store_n(&disk_last_errno, w < 0 ? errno : EIO, __ATOMIC_SEQ_CST);
            __atomic_add_fetch(&disk_errors, 1, __ATOMIC_SEQ_CST);
            sleep_ms(10); /* then retry the same seq: it was never acknowledged */
            continue;
        }
        /* the write and its flush returned: this record is acknowledged */
        __atomic_store_n(&disk_acked, seq, __ATOMIC_SEQ_CST);
        if (disk_interval_ms) sleep_ms(disk_interval_ms);
    }
    free(mem);
    return NULL;
}

static void disk_status_fields(struct resp *r) {
    resp_add(r, " acked=%llu running=%d errors=%llu full=%d size=%llu last_errno=%d",
             (unsigned long long)__atomic_load_n(&disk_acked, __ATOMIC_SEQ_CST),
             disk_running && !__atomic_load_n(&disk_full, __ATOMIC_SEQ_CST),
             (unsigned long long)__atomic_load_n(&disk_errors, __ATOMIC_SEQ_CST),
             __atomic_load_n(&disk_full, __ATOMIC_SEQ_CST), (unsigned long long)disk_size,
             __atomic_load_n(&disk_last_errno, __ATOMIC_SEQ_CST));
}

/* caller holds disk_lock */
static void disk_stop_locked(void) {
    if (!disk_running) return;
    __atomic_store_n(&disk_stop_flag, 1, __ATOMIC_SEQ_CST);
    pthread_join(disk_thread, NULL);
    disk_running = 0;
}

static void cmd_disk_start(struct resp *r, const char *arg) {
    char *end = NULL;
    unsigned long iv = arg ? strtoul(arg, &end, 10) : 0;
    if (!arg || *arg == '-' || *end || iv > 3600000) {
        resp_err(r, "usage: DISK START <interval_ms 0..3600000>");
        return;
    }
    pthread_mutex_lock(&disk_lock);
    disk_stop_locked();
    if (disk_fd < 0) {
        disk_fd = disk_open(O_DSYNC, &disk_direct);
        if (disk_fd < 0) {
            char msg[160];
            snprintf(msg, sizeof msg, "cannot open %s: %s", g_disk_path, strerror(errno));
            pthread_mutex_unlock(&disk_lock);
            resp_err(r, msg);
            return;
        }
    }
    disk_size = fd_size(disk_fd);
    disk_interval_ms = (unsigned)iv;
    __atomic_store_n(&disk_full, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&disk_stop_flag, 0, __ATOMIC_SEQ_CST);
    if (pthread_create(&disk_thread, NULL, disk_main, NULL) != 0) {
        pthread_mutex_unlock(&disk_lock);
        resp_err(r, "cannot start disk writer thread");
        return;
    }
    disk_running = 1;
    resp_ok(r);
    resp_add(r, " interval=%u direct=%d", disk_interval_ms, disk_direct);
    disk_status_fields(r);
    pthread_mutex_unlock(&disk_lock);
}

static void cmd_disk_stop(struct resp *r) {
    pthread_mutex_lock(&disk_lock);
    disk_stop_locked();
    resp_ok(r);
    disk_status_fields(r);
    pthread_mutex_unlock(&disk_lock);
}

static void cmd_disk_status(struct resp *r) {
    pthread_mutex_lock(&disk_lock);
    resp_ok(r);
    disk_status_fields(r);
    pthread_mutex_unlock(&disk_lock);
}

static void cmd_disk_verify(struct resp *r) {
    uint64_t acked = __atomic_load_n(&disk_acked, __ATOMIC_SEQ_CST);
    int direct = 0;
    int fd = disk_open(0, &direct);
    if (fd < 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "cannot open %s: %s", g_disk_path, strerror(errno));
        resp_err(r, msg);
        return;
    }
    void *mem = NULL;
    if (posix_memalign(&mem, PAGE, (size_t)REC_SIZE * VERIFY_BATCH) != 0) {
        close(fd);
        resp_err(r, "out of memory");
        return;
    }
    unsigned char *buf = mem;
    uint64_t ok = 0, bad = 0, nbad = 0;
    for (uint64_t seq = 1; seq <= acked;) {
        uint64_t n = acked - seq + 1;
        if (n > VERIFY_BATCH) n = VERIFY_BATCH;
        ssize_t got = pread(fd, buf, (size_t)(n * REC_SIZE), (off_t)((seq - 1) * REC_SIZE));
        if (got < (ssize_t)(n * REC_SIZE)) {
            uint64_t whole = got > 0 ? (uint64_t)got / REC_SIZE : 0;
            if (whole == 0) { /* unreadable: count the rest as bad */
                if (!bad) bad = seq;
                nbad += acked - seq + 1;
                break;
            }
            n = whole;
        }
        for (uint64_t i = 0; i < n; i++, seq++) {
            if (record_check(buf + i * REC_SIZE, seq) == 0) {
                ok++;
            } else {
                if (!bad) bad = seq;
                nbad++;
            }
        }
    }
    free(mem);
    close(fd);
    resp_ok(r);
    resp_add(r, " ok=%llu bad=%llu nbad=%llu acked=%llu", (unsigned long long)ok,
             (unsigned long long)bad, (unsigned long long)nbad, (unsigned long long)acked);
}

static void cmd_disk(struct resp *r, char *args) {
    char *sub = strtok_r(args, " ", &args);
    char *a1 = strtok_r(NULL, " ", &args);
    char *extra = strtok_r(NULL, " ", &args);
    if (sub && strcasecmp(sub, "START") == 0 && !extra) {
        cmd_disk_start(r, a1);
    } else if (sub && !a1 && strcasecmp(sub, "STOP") == 0) {
        cmd_disk_stop(r);
    } else if (sub && !a1 && strcasecmp(sub, "STATUS") == 0) {
        cmd_disk_status(r);
    } else if (sub && !a1 && strcasecmp(sub, "VERIFY") == 0) {
        cmd_disk_verify(r);
    } else {
        resp_err(r, "usage: DISK START <interval_ms> | DISK STOP | DISK STATUS | DISK VERIFY");
    }
}

/* ------------------------------------------------------------------------------------------ */
/* INFO */

static void cmd_info(struct resp *r) {
    /* flags of cpu0 from /proc/cpuinfo */
    char flags[4096];
    flags[0] = 0;
    unsigned nflags = 0;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[8192];
        while (fgets(line, sizeof line, f)) {
            if (strncmp(line, "flags", 5) != 0) continue;
            char *colon = strchr(line, ':');
            if (!colon) break;
            char *save = NULL;
            size_t len = 0;
            for (char *tok = strtok_r(colon + 1, " \t\n", &save); tok;
                 tok = strtok_r(NULL, " \t\n", &save)) {
                size_t tl = strlen(tok);
                if (len + tl + 2 >= sizeof flags) break;
                if (len) flags[len++] = ',';
                memcpy(flags + len, tok, tl);
                len += tl;
                flags[len] = 0;
                nflags++;
            }
            break; /* cpu0 only */
        }
        fclose(f);
    }
    struct timespec bt;
    clock_gettime(CLOCK_BOOTTIME, &bt);
    struct utsname u;
    if (uname(&u) != 0) strcpy(u.release, "unknown");
    resp_ok(r);
    resp_add(r, " uptime=%lld.%03ld mem_total_kib=%ld mem_avail_kib=%ld cpus=%ld kernel=%s",
             (long long)bt.tv_sec, bt.tv_nsec / 1000000, meminfo_kib("MemTotal"),
             meminfo_kib("MemAvailable"), cpus, u.release);
    resp_add(r, " port=%d nflags=%u flags=%s", g_port, nflags, nflags ? flags : "-");
}

/* ------------------------------------------------------------------------------------------ */
/* connections */

static int g_conns; /* atomic */

struct conn {
    int fd;
    char in[LINE_MAX_LEN * 4];
    size_t have;
};

/* Returns 1 with a line (without '\n', '\r' stripped) in out, 0 on EOF/error, -1 if too long
 * (the rest of that line is discarded). */
static int read_line(struct conn *c, char *out, size_t outsz) {
    int overflow = 0;
    for (;;) {
        char *nl = memchr(c->in, '\n', c->have);
        if (nl) {
            size_t len = (size_t)(nl - c->in);
            if (!overflow) {
                if (len >= outsz) {
                    overflow = 1;
                } else {
                    memcpy(out, c->in, len);
                    out[len] = 0;
                    if (len && out[len - 1] == '\r') out[len - 1] = 0;
                }
            }
            memmove(c->in, nl + 1, c->have - len - 1);
            c->have -= len + 1;
            return overflow ? -1 : 1;
        }
        if (c->have == sizeof c->in) { /* no newline in a full buffer: drop it, remember */
            overflow = 1;
            c->have = 0;
        }
        ssize_t n = recv(c->fd, c->in + c->have, sizeof c->in - c->have, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 0;
        c->have += (size_t)n;
    }
}

static void serve_http(struct conn *c) {
    /* read the request headers up to the blank line (bounded by the receive timeout) */
    struct timeval tv = {2, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char line[LINE_MAX_LEN];
    for (int i = 0; i < 100; i++) {
        int rc = read_line(c, line, sizeof line);
        if (rc == 0 || (rc == 1 && line[0] == 0)) break;
    }
    struct resp body;
    resp_ok(&body);
    /* body: "kvmotion guestd n=.. t=.. rt=.." */
    char text[RESP_MAX];
    int blen = snprintf(text, sizeof text, "kvmotion guestd %s\n", body.buf + 3);
    char head[256];
    int hlen = snprintf(head, sizeof head,
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                        "Connection: close\r\n\r\n",
                        blen);
    if (send_all(c->fd, head, (size_t)hlen) == 0) send_all(c->fd, text, (size_t)blen);
    shutdown(c->fd, SHUT_WR);
    /* drain briefly so close() does not turn into a reset that eats the response */
    char sink[512];
    for (int i = 0; i < 16 && recv(c->fd, sink, sizeof sink, 0) > 0; i++) {
    }
}

static void dispatch(struct conn *c, char *line, struct resp *r, int *quit) {
    char *rest = line;
    while (*rest == ' ') rest++;
    char *cmd = strtok_r(rest, " ", &rest);
    r->len = 0;
    if (!cmd) {
        resp_err(r, "empty request");
    } else if (strcasecmp(cmd, "PING") == 0) {
        resp_ok(r);
    } else if (strcasecmp(cmd, "DIRTY") == 0) {
        cmd_dirty(r, rest);
    } else if (strcasecmp(cmd, "DIRTYSTAT") == 0) {
        cmd_dirtystat(r);
    } else if (strcasecmp(cmd, "CHECKSUM") == 0) {
        cmd_checksum(r);
    } else if (strcasecmp(cmd, "DISK") == 0) {
        cmd_disk(r, rest);
    } else if (strcasecmp(cmd, "INFO") == 0) {
        cmd_info(r);
    } else if (strcasecmp(cmd, "QUIT") == 0) {
        resp_ok(r);
        resp_add(r, " bye=1");
        *quit = 1;
    } else {
        resp_err(r, "unknown command (PING DIRTY DIRTYSTAT CHECKSUM DISK INFO QUIT)");
    }
    (void)c;
}

static void *conn_main(void *arg) {
    struct conn *c = arg;
    char line[LINE_MAX_LEN];
    struct resp *r = malloc(sizeof *r);
    int first = 1;
    while (r) {
        int rc = read_line(c, line, sizeof line);
        if (rc == 0) break;
        if (first && rc == 1 && strncmp(line, "GET ", 4) == 0) {
            serve_http(c);
            break;
        }
        first = 0;
        int quit = 0;
        if (rc < 0)
            resp_err(r, "line too long");
        else
            dispatch(c, line, r, &quit);
        r->buf[r->len++] = '\n';
        if (send_all(c->fd, r->buf, r->len) != 0) break;
        if (quit) break;
    }
    free(r);
    close(c->fd);
    free(c);
    __atomic_sub_fetch(&g_conns, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

static void usage(void) {
    fprintf(stderr, "usage: guestd [-p PORT] [-d DISK] [-r READY_LINE]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *ready = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "p:d:r:")) != -1) {
        switch (opt) {
        case 'p':
            g_port = atoi(optarg);
            if (g_port <= 0 || g_port > 65535) usage();
            break;
        case 'd':
            g_disk_path = optarg;
            break;
        case 'r':
            ready = optarg;
            break;
        default:
            usage();
        }
    }
    signal(SIGPIPE, SIG_IGN);
    crc32_init();

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ls < 0) {
        perror("guestd: socket");
        return 1;
    }
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)g_port);
    sa.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(ls, 128) != 0) {
        perror("guestd: bind/listen");
        return 1;
    }
    if (ready) {
        printf("%s\n", ready);
        fflush(stdout);
    }

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (;;) {
        int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOMEM) {
                sleep_ms(10);
                continue;
            }
            perror("guestd: accept");
            return 1;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (__atomic_add_fetch(&g_conns, 1, __ATOMIC_SEQ_CST) > MAX_CONNS) {
            static const char busy[] = "ERR too many connections\n";
            send_all(fd, busy, sizeof busy - 1);
            close(fd);
            __atomic_sub_fetch(&g_conns, 1, __ATOMIC_SEQ_CST);
            continue;
        }
        struct conn *c = calloc(1, sizeof *c);
        pthread_t th;
        if (!c) {
            close(fd);
            __atomic_sub_fetch(&g_conns, 1, __ATOMIC_SEQ_CST);
            continue;
        }
        c->fd = fd;
        if (pthread_create(&th, &attr, conn_main, c) != 0) {
            close(fd);
            free(c);
            __atomic_sub_fetch(&g_conns, 1, __ATOMIC_SEQ_CST);
        }
    }
}
