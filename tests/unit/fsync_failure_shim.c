#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
/* fsync/fdatasync of a *-wal file fail with EIO while $FSYNC_FAILS names an existing file; if that file is
   empty the failure is one-shot (the file is removed at the first one). */
static int should_fail(int fd) {
    const char *trigger = getenv("FSYNC_FAILS");
    if (!trigger || access(trigger, F_OK) != 0) return 0;
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n <= 4) return 0;
    target[n] = 0;
    if (strcmp(target + n - 4, "-wal") != 0) return 0;
    FILE *f = fopen(trigger, "r");
    int persistent = f && fgetc(f) != EOF;
    if (f) fclose(f);
    if (!persistent) unlink(trigger);
    return 1;
}
int fsync(int fd) {
    static int (*real)(int) = 0; if (!real) real = dlsym(RTLD_NEXT, "fsync");
    if (should_fail(fd)) { errno = EIO; return -1; }
    return real(fd);
}
int fdatasync(int fd) {
    static int (*real)(int) = 0; if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    if (should_fail(fd)) { errno = EIO; return -1; }
    return real(fd);
}
