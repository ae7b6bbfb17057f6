/*
 * kvmrun-init: /init of the initramfs `kvmrun run KERNEL --rootfs ...`
 * generates (src/rootfs/). Runs one command in a root the host gives and
 * reports how it ended; no shell, no busybox.
 *
 * The initramfs holds, besides this program:
 *   /kvmrun/modules  module files to load, one path a line, in order
 *                    (each after the modules it needs)
 *   /kvmrun/root     where the root is: "virtiofs TAG" (a virtio-fs
 *                    share) or "dir PATH" (a directory in the initramfs)
 *   /kvmrun/argv     the command and its arguments, each ending in NUL
 *
 * Steps: mount proc, sys, dev and a tmpfs; load the modules
 * (finit_module); mount the root read-only with a tmpfs overlay for
 * writes, as vng does (read-only without one if overlayfs is missing);
 * move into it; find the virtio-console ports by name (PORT_NAME):
 * kvmrun.stdin, kvmrun.stdout, kvmrun.stderr as the command's fds 0, 1
 * and 2, and kvmrun.status; run the command and wait for it, reaping
 * whatever else ends; write its ending to kvmrun.status and power off.
 *
 * The status protocol, one line on kvmrun.status: "exit N" (N = 0..255)
 * or "signal S" (the signal that ended the command). A port write
 * returns once the device took the bytes, so the line is on the host
 * before the power-off. Anything init itself cannot do is "init MESSAGE".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NEWROOT "/kvmrun/newroot"
#define LOWER "/kvmrun/lower"
#define RW "/kvmrun/rw"
/* Backstop for ports to appear: a kernel without the console driver
 * never shows them. */
#define PORT_WAIT_MS 30000
#define MAX_ARGS 4096

static int status_fd = -1;

/* A message on the kernel console (the host's kernel log). */
static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
	if (fd >= 0) {
		(void)!write(fd, "kvmrun-init: ", 13);
		(void)!write(fd, buf, n);
		close(fd);
	}
}

static void power_off(void)
{
	sync();
	reboot(RB_POWER_OFF);
	say("power-off failed: %s", strerror(errno));
	for (;;)
		pause();
}

/*
 * Report `line` to the host and end. The line also goes to the serial
 * console: a port write returns before the host took the bytes
 * (Linux's port_fops_write does not wait), while each serial byte is a
 * port I/O the vCPU completes before the power-off, so kvmrun falls back
 * to the kernel log's copy when the port's is missing.
 */
static void report(const char *line)
{
	say("report: %.*s", (int)strcspn(line, "\n"), line);
	if (status_fd >= 0) {
		size_t n = strlen(line);
		if (write(status_fd, line, n) != (ssize_t)n)
			say("cannot report '%s': %s", line, strerror(errno));
	}
	power_off();
}

static void fail(const char *fmt, ...)
{
	char buf[400], line[420];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	say("%s", buf);
	snprintf(line, sizeof(line), "init %s\n", buf);
	report(line);
}

/* The whole of a small file, NUL-terminated; its length in *len. */
static char *slurp(const char *path, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	size_t cap = 4096, n = 0;
	char *buf = malloc(cap + 1);
	for (;;) {
		if (n == cap)
			buf = realloc(buf, (cap *= 2) + 1);
		ssize_t got = read(fd, buf + n, cap - n);
		if (got <= 0)
			break;
		n += got;
	}
	close(fd);
	buf[n] = 0;
	if (len)
		*len = n;
	return buf;
}

static void mount_or_fail(const char *src, const char *dst, const char *type, unsigned long flags,
			  const char *data)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, flags, data) != 0)
		fail("mount %s on %s: %s", type ? type : src, dst, strerror(errno));
}

static void load_modules(void)
{
	char *list = slurp("/kvmrun/modules", NULL);
	if (!list)
		return;
	for (char *line = strtok(list, "\n"); line; line = strtok(NULL, "\n")) {
		int fd = open(line, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			say("module %s: %s", line, strerror(errno));
			continue;
		}
		size_t l = strlen(line);
		/* MODULE_INIT_COMPRESSED_FILE: the kernel unpacks .ko.xz/.zst/.gz. */
		int flags = (l > 3 && strcmp(line + l - 3, ".ko") != 0) ? 4 : 0;
		if (syscall(SYS_finit_module, fd, "", flags) != 0 && errno != EEXIST)
			say("module %s: %s", line, strerror(errno));
		close(fd);
	}
	free(list);
}

/* The root, read-only, at LOWER; then an overlay with a tmpfs upper at
 * NEWROOT (or the read-only root itself if overlayfs is missing). */
static void mount_root(void)
{
	char *spec = slurp("/kvmrun/root", NULL);
	if (!spec)
		fail("no /kvmrun/root");
	spec[strcspn(spec, "\n")] = 0;
	mkdir(LOWER, 0755);
	if (!strncmp(spec, "virtiofs ", 9)) {
		mount_or_fail(spec + 9, LOWER, "virtiofs", MS_RDONLY, NULL);
	} else if (!strncmp(spec, "dir ", 4)) {
		mount_or_fail(spec + 4, LOWER, NULL, MS_BIND | MS_REC, NULL);
		mount_or_fail(NULL, LOWER, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL);
	} else {
		fail("unknown root '%s'", spec);
	}
	mount_or_fail("tmpfs", RW, "tmpfs", 0, "mode=0755");
	mkdir(RW "/upper", 0755);
	mkdir(RW "/work", 0755);
	mkdir(NEWROOT, 0755);
	if (mount("overlay", NEWROOT, "overlay", 0,
		  "lowerdir=" LOWER ",upperdir=" RW "/upper,workdir=" RW "/work") != 0) {
		say("no overlay (%s): the root stays read-only", strerror(errno));
		mount_or_fail(LOWER, NEWROOT, NULL, MS_BIND | MS_REC, NULL);
	}
	free(spec);
}

/* Move proc, sys and dev into the new root and make it /. */
static void switch_root(void)
{
	static const char *keep[] = { "/proc", "/sys", "/dev" };
	for (unsigned i = 0; i < 3; i++) {
		char dst[64];
		snprintf(dst, sizeof(dst), NEWROOT "%s", keep[i]);
		mkdir(dst, 0755);
		if (mount(keep[i], dst, NULL, MS_MOVE, NULL) != 0)
			say("move %s: %s", keep[i], strerror(errno));
	}
	if (chdir(NEWROOT) != 0 || mount(".", "/", NULL, MS_MOVE, NULL) != 0 || chroot(".") != 0 ||
	    chdir("/") != 0)
		fail("switch to the new root: %s", strerror(errno));
	/* A read-only root without them gets none. */
	mkdir("/tmp", 01777);
	mkdir("/run", 0755);
	if (mount("tmpfs", "/tmp", "tmpfs", 0, "mode=1777") != 0)
		say("tmpfs on /tmp: %s", strerror(errno));
	if (mount("tmpfs", "/run", "tmpfs", 0, "mode=0755") != 0)
		say("tmpfs on /run: %s", strerror(errno));
	mkdir("/dev/pts", 0755);
	mount("devpts", "/dev/pts", "devpts", 0, "mode=0620,ptmxmode=0666");
}

/* /dev/vportNpM of the port named `name`, opened with `flags`, or -1. */
static int open_port(const char *name, int flags)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return -1;
	int fd = -1;
	struct dirent *e;
	while (fd < 0 && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char path[300];
		snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
		char *n = slurp(path, NULL);
		if (!n)
			continue;
		n[strcspn(n, "\n")] = 0;
		if (!strcmp(n, name)) {
			snprintf(path, sizeof(path), "/dev/%s", e->d_name);
			fd = open(path, flags | O_CLOEXEC);
		}
		free(n);
	}
	closedir(d);
	return fd;
}

/* Wait for the port: the driver adds ports after its probe. */
static int wait_port(const char *name, int flags)
{
	struct timespec ms = { 0, 1000000 };
	for (int t = 0; t < PORT_WAIT_MS; t++) {
		int fd = open_port(name, flags);
		if (fd >= 0)
			return fd;
		nanosleep(&ms, NULL);
	}
	return -1;
}

static char **read_argv(void)
{
	size_t len;
	char *buf = slurp("/kvmrun/argv", &len);
	if (!buf || !len)
		fail("no command in /kvmrun/argv");
	char **argv = calloc(MAX_ARGS + 1, sizeof(char *));
	size_t n = 0;
	for (size_t at = 0; at < len && n < MAX_ARGS; at += strlen(buf + at) + 1)
		argv[n++] = buf + at;
	return argv;
}

static void run(char **argv, int in, int out, int err)
{
	pid_t pid = fork();
	if (pid < 0)
		fail("fork: %s", strerror(errno));
	if (pid == 0) {
		setsid();
		if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
			_exit(126);
		execvp(argv[0], argv);
		int e = errno;
		dprintf(2, "kvmrun-init: %s: %s\n", argv[0], strerror(e));
		_exit(e == ENOENT ? 127 : 126);
	}
	for (;;) {
		int st;
		pid_t got = wait(&st);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			fail("wait: %s", strerror(errno));
		if (got != pid)
			continue;
		char line[64];
		if (WIFSIGNALED(st))
			snprintf(line, sizeof(line), "signal %d\n", WTERMSIG(st));
		else
			snprintf(line, sizeof(line), "exit %d\n", WEXITSTATUS(st));
		report(line);
	}
}

int main(void)
{
	if (getpid() != 1) {
		fprintf(stderr, "kvmrun-init: only the kernel starts this, as /init\n");
		return 2;
	}
	mount_or_fail("proc", "/proc", "proc", 0, NULL);
	mount_or_fail("sysfs", "/sys", "sysfs", 0, NULL);
	mount_or_fail("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	load_modules();
	status_fd = wait_port("kvmrun.status", O_WRONLY);
	if (status_fd < 0)
		fail("no port named kvmrun.status");
	char **argv = read_argv();
	mount_root();
	switch_root();
	int in = wait_port("kvmrun.stdin", O_RDONLY);
	int out = wait_port("kvmrun.stdout", O_WRONLY);
	int err = wait_port("kvmrun.stderr", O_WRONLY);
	if (in < 0 || out < 0 || err < 0)
		fail("console ports missing (stdin %d, stdout %d, stderr %d)", in, out, err);
	setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
	setenv("HOME", "/root", 1);
	setenv("TERM", "dumb", 1);
	run(argv, in, out, err);
	return 0;
}
