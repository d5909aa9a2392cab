"""Power loss, simulated: what a process's files would hold if the machine lost power now.

kill -9 loses nothing a process wrote (the kernel still has it), so it cannot show a commit
acknowledged before its fsync. This shim, preloaded into the daemon (LD_PRELOAD), logs every
write and truncate the process makes to files under one directory, and each fsync/fdatasync
that completes; :func:`durable_image` then rebuilds each file as the disk holds it for sure:
its first content plus the writes logged before the start of its last completed sync. Writes
not covered by a sync are all lost (one outcome a real power loss may have, and the harshest
for an acknowledgement). The daemon keeps writing through its own descriptors: the shim opens
no file under the directory (DESIGN.md's lock pitfall).

Records (little-endian): b"W" path-length(u32) path offset(u64) length(u64) data; b"T" ... size(u64);
b"S" ... position(u64) time(u64, ns since the epoch, read when the sync returned): the writes to
path logged before that position of the log are durable from that time on. So the image can be
rebuilt as of any instant of the run (``at``), not only its end.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int logfd = -1;
static const char *dir;
static size_t dirlen;
static uint64_t logpos;
static pid_t owner;                 /* the process that loaded the shim: its children log nothing */
static ssize_t (*r_write)(int, const void *, size_t);
static ssize_t (*r_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*r_pwrite64)(int, const void *, size_t, off64_t);
static int (*r_fsync)(int);
static int (*r_fdatasync)(int);
static int (*r_ftruncate)(int, off_t);
static int (*r_ftruncate64)(int, off64_t);

__attribute__((constructor)) static void init(void) {
    r_write = dlsym(RTLD_NEXT, "write");
    r_pwrite = dlsym(RTLD_NEXT, "pwrite");
    r_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    r_fsync = dlsym(RTLD_NEXT, "fsync");
    r_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    r_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    r_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    dir = getenv("POWERLOSS_DIR");
    const char *log = getenv("POWERLOSS_LOG");
    owner = getpid();
    if (dir && log) {
        dirlen = strlen(dir);
        logfd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    }
}

/* the file's path if it lies under dir, else 0 */
static int tracked(int fd, char *path, size_t size) {
    if (logfd < 0 || fd == logfd || getpid() != owner) return 0;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, size - 1);
    if (n <= 0 || (size_t)n <= dirlen || strncmp(path, dir, dirlen) != 0 || path[dirlen] != '/') return 0;
    path[n] = 0;
    return (int)n;
}

static void put(const void *p, size_t n) {
    const char *c = p;
    while (n > 0) {
        ssize_t w = r_write(logfd, c, n);
        if (w <= 0) abort();        /* a log with a hole would lie about what is durable */
        c += w; n -= (size_t)w; logpos += (uint64_t)w;
    }
}

static void record(char kind, const char *path, uint32_t plen, uint64_t a, uint64_t b, const void *data) {
    pthread_mutex_lock(&mu);
    put(&kind, 1); put(&plen, 4); put(path, plen); put(&a, 8);
    if (kind != 'T') put(&b, 8);
    if (kind == 'W') put(data, b);
    pthread_mutex_unlock(&mu);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    ssize_t r = r_pwrite(fd, buf, n, off);
    char path[4096]; int plen;
    if (r > 0 && (plen = tracked(fd, path, sizeof path))) record('W', path, plen, off, r, buf);
    return r;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off) {
    ssize_t r = r_pwrite64(fd, buf, n, off);
    char path[4096]; int plen;
    if (r > 0 && (plen = tracked(fd, path, sizeof path))) record('W', path, plen, off, r, buf);
    return r;
}

ssize_t write(int fd, const void *buf, size_t n) {
    char path[4096]; int plen = tracked(fd, path, sizeof path);
    off_t off = plen ? lseek(fd, 0, SEEK_CUR) : 0;
    ssize_t r = r_write(fd, buf, n);
    if (r > 0 && plen) record('W', path, plen, off, r, buf);
    return r;
}

static int sync_with(int (*real)(int), int fd) {
    char path[4096]; int plen = tracked(fd, path, sizeof path);
    pthread_mutex_lock(&mu);
    uint64_t start = logpos;            /* what was logged before the sync began */
    pthread_mutex_unlock(&mu);
    int r = real(fd);
    struct timespec now;            /* taken after the sync returned: before anything it made durable is answered */
    clock_gettime(CLOCK_REALTIME, &now);
    if (r == 0 && plen) record('S', path, plen, start, (uint64_t)now.tv_sec * 1000000000u + now.tv_nsec, 0);
    return r;
}

int fsync(int fd) { return sync_with(r_fsync, fd); }
int fdatasync(int fd) { return sync_with(r_fdatasync, fd); }

int ftruncate(int fd, off_t size) {
    int r = r_ftruncate(fd, size);
    char path[4096]; int plen;
    if (r == 0 && (plen = tracked(fd, path, sizeof path))) record('T', path, plen, size, 0, 0);
    return r;
}

int ftruncate64(int fd, off64_t size) {
    int r = r_ftruncate64(fd, size);
    char path[4096]; int plen;
    if (r == 0 && (plen = tracked(fd, path, sizeof path))) record('T', path, plen, size, 0, 0);
    return r;
}
"""


def build_shim(where: Path) -> Path | None:
    """Compile the shim into where/powerloss.so; None if no C compiler is installed."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, lib = where / "powerloss.c", where / "powerloss.so"
    src.write_text(SHIM_C)
    subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl", "-lpthread"], check=True)
    return lib


def env(lib: Path, watched: Path, log: Path) -> dict[str, str]:
    """The environment for a process whose writes under ``watched`` are logged to ``log``."""
    return {**os.environ, "LD_PRELOAD": str(lib), "POWERLOSS_DIR": str(watched.resolve()),
            "POWERLOSS_LOG": str(log)}


def durable_image(log: Path, before: dict[str, bytes], out: Path, at: int | None = None) -> dict[str, int]:
    """Write into ``out`` each file as it would be after a power loss at time ``at`` (ns since
    the epoch; default: the end of the log). ``before``: the files' durable content when logging
    began (name -> bytes; a file absent then is not there). Returns, per file, how many logged
    writes it lost (not covered by a sync completed by then)."""
    data = log.read_bytes()
    records: list[tuple[int, str, str, int, bytes]] = []      # (position, kind, file name, a, data)
    synced: dict[str, int] = {}
    i = 0
    while i < len(data):
        at_pos = i
        kind = data[i:i + 1].decode()
        (plen,) = struct.unpack_from("<I", data, i + 1)
        name = os.path.basename(data[i + 5:i + 5 + plen].decode())
        i += 5 + plen
        (a,) = struct.unpack_from("<Q", data, i)
        i += 8
        b = 0
        if kind != "T":
            (b,) = struct.unpack_from("<Q", data, i)
            i += 8
        if kind == "S":
            if at is None or b <= at:
                synced[name] = max(synced.get(name, 0), a)
        else:
            records.append((at_pos, kind, name, a, data[i:i + b] if kind == "W" else b""))
            i += b if kind == "W" else 0
    files = {name: bytearray(content) for name, content in before.items()}
    lost: dict[str, int] = {}
    for pos, kind, name, a, body in records:
        if pos >= synced.get(name, -1):
            lost[name] = lost.get(name, 0) + 1
            continue
        f = files.setdefault(name, bytearray())
        if kind == "T":
            del f[a:]
            f.extend(b"\0" * (a - len(f)))
        else:
            if len(f) < a:
                f.extend(b"\0" * (a - len(f)))
            f[a:a + len(body)] = body
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, content in files.items():
        (out / name).write_bytes(bytes(content))
    return lost
