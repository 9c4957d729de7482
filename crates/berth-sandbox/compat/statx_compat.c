/*
 * Preloaded (via /etc/ld.so.preload) into gVisor boxes only.
 *
 * gVisor releases before 2023 (Debian 12 ships one) answer EINVAL to statx(2) and
 * newfstatat(2) when the flags carry AT_NO_AUTOMOUNT, which glibc's and coreutils' callers
 * pass on every call: `ls`, `stat`, `find` then fail on every file. The flag only concerns
 * automount points, which a box has none of, so dropping it changes no result.
 */
#define _GNU_SOURCE
#include <sys/syscall.h>
#include <unistd.h>

#ifndef AT_NO_AUTOMOUNT
#define AT_NO_AUTOMOUNT 0x800
#endif

struct statx;
struct stat;

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf)
{
    return (int)syscall(SYS_statx, dirfd, path, flags & ~AT_NO_AUTOMOUNT, mask, buf);
}

int fstatat(int dirfd, const char *path, struct stat *buf, int flags)
{
    return (int)syscall(SYS_newfstatat, dirfd, path, buf, flags & ~AT_NO_AUTOMOUNT);
}

int fstatat64(int dirfd, const char *path, struct stat *buf, int flags)
{
    return (int)syscall(SYS_newfstatat, dirfd, path, buf, flags & ~AT_NO_AUTOMOUNT);
}
