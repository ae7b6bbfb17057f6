/*
 * Drive a virtio-fs share with FUSE requests, as Linux's driver sends
 * them, on queue 0 (hiprio: the library's driver has one queue, and the
 * device serves both alike): `transport=pci` (the first 1af4:105a
 * function) or `transport=mmio` (the first LNRO0005 window), `mode=rw|ro`,
 * `tag=T` the tag to expect. The host's directory holds `hello` ("hello
 * from the host\n") and a symbolic link `etc` to /etc, and sits next to
 * a file `secret`; with `null`, also a character device `null` (1:3).
 *
 * - every mode: the tag and one request queue in the configuration;
 *   INIT; LOOKUP and READ of hello; `..` at the root is the root, and
 *   `secret` is not found from it; names with a slash refused (EINVAL);
 *   the link is a link (READLINK gives "/etc") and is never opened
 *   (READ and LOOKUP through it fail); with `null`, READ of the device
 *   refused (EACCES);
 * - rw: CREATE `from-guest` and WRITE "written by the guest\n" to it;
 *   MKNOD of a block device refused (EPERM), of a fifo `fifo` made;
 * - ro: CREATE, MKDIR and WRITE refused with EROFS.
 *
 * With `wait`: a READ of hello is offered without a notification (a
 * request in flight), then wait for a key on COM1 (a test snapshots
 * there); after it, notify, check the READ's reply, and (rw) WRITE
 * "after the key\n" at the end of from-guest.
 */
#include "guest.h"

#define LOOKUP 1
#define READLINK 5
#define MKNOD 8
#define MKDIR 9
#define READ 15
#define WRITE 16
#define INIT 26
#define CREATE 35
#define ROOT 1
#define EINVAL 22
#define ENOENT 2
#define EPERM 1
#define EACCES 13
#define EROFS 30
#define S_IFMT 0170000
#define S_IFLNK 0120000
#define S_IFBLK 0060000
#define S_IFIFO 0010000

struct in_header {
	u32 len, opcode;
	u64 unique, nodeid;
	u32 uid, gid, pid;
	u16 extlen, padding;
};

struct out_header {
	u32 len;
	int error;
	u64 unique;
};

struct io_in {
	u64 fh, offset;
	u32 size, io_flags;
	u64 lock_owner;
	u32 flags, padding;
};

static u8 req[4096] __attribute__((aligned(4096)));
static u8 rep[8192] __attribute__((aligned(4096)));
static struct out_header *const out = (struct out_header *)rep;
static u8 *const body = rep + sizeof(struct out_header);
static u64 unique;

/* Lay out a request in `req`: header, `a` (`alen` bytes), then the
 * strings `s1` and `s2` with their NULs (either may be NULL). */
static u32 build(u32 opcode, u64 node, const void *a, u32 alen, const char *s1, const char *s2)
{
	struct in_header *h = (struct in_header *)req;
	u32 n = sizeof(*h);
	memcpy(req + n, a, alen);
	n += alen;
	for (const char *s = s1; s; s = (s == s1) ? s2 : NULL) {
		u32 l = strlen(s) + 1;
		memcpy(req + n, s, l);
		n += l;
	}
	*h = (struct in_header){ n, opcode, ++unique, node, 0, 0, 1, 0, 0 };
	return n;
}

static void offer(u32 len)
{
	struct virtio_desc ds[2] = {
		{ (u64)req, len, VIRTQ_DESC_F_NEXT, 1 },
		{ (u64)rep, sizeof(rep), VIRTQ_DESC_F_WRITE, 0 },
	};
	memset(rep, 0xff, sizeof(*out));
	virtio_offer_quiet(ds, 2, 0, 1);
}

/* Send a request and wait for its reply: the error (0 or -errno). */
static int call(struct virtio_dev *d, u32 opcode, u64 node, const void *a, u32 alen,
		const char *s1, const char *s2)
{
	offer(build(opcode, node, a, alen, s1, s2));
	virtio_notify(d);
	u32 used = virtio_wait_used(d);
	if (used < sizeof(*out) || out->unique != unique || out->len != used) {
		printf("opcode %u: used %u, reply len %u unique %lu\n", opcode, used, out->len,
		       out->unique);
		return -1000;
	}
	return out->error;
}

/* LOOKUP `name` in `parent`: its node ID (0 on error, kept in *err). */
static u64 lookup(struct virtio_dev *d, u64 parent, const char *name, int *err)
{
	*err = call(d, LOOKUP, parent, NULL, 0, name, NULL);
	return *err ? 0 : *(u64 *)body;
}

static u32 entry_mode(void) { return *(u32 *)(body + 100); }

static int read_file(struct virtio_dev *d, u64 node, u32 size)
{
	struct io_in r = { .size = size };
	return call(d, READ, node, &r, sizeof(r), NULL, NULL);
}

static int write_file(struct virtio_dev *d, u64 node, u64 at, const char *text)
{
	u8 a[sizeof(struct io_in) + 64];
	struct io_in w = { .offset = at, .size = strlen(text), .flags = 1 };
	memcpy(a, &w, sizeof(w));
	memcpy(a + sizeof(w), text, w.size);
	return call(d, WRITE, node, a, sizeof(w) + w.size, NULL, NULL);
}

static const char hello[] = "hello from the host\n";

static bool body_is(const char *want)
{
	u32 n = strlen(want);
	return out->len == sizeof(*out) + n && !memcmp(body, want, n);
}

static void check_share(struct virtio_dev *d, const char *tag, bool ro, bool null)
{
	char got[37];
	for (int i = 0; i < 36; i++)
		got[i] = mmio_read8(d->device + i);
	got[36] = 0;
	printf("tag '%s', %u request queues\n", got, mmio_read32(d->device + 36));
	report(!strncmp(got, tag, 37), "tag");
	report(mmio_read32(d->device + 36) == 1, "one-request-queue");
	u32 init[4] = { 7, 31, 0, (1u << 17) | (1u << 24) };
	report(call(d, INIT, 0, init, sizeof(init), NULL, NULL) == 0, "init");
	int e;
	u64 h = lookup(d, ROOT, "hello", &e);
	report(h != 0, "lookup");
	report(read_file(d, h, 100) == 0 && body_is(hello), "read");
	u64 up = lookup(d, ROOT, "..", &e);
	report(up == ROOT, "dotdot-is-root");
	lookup(d, up, "secret", &e);
	report(e == -ENOENT, "secret-not-found");
	lookup(d, ROOT, "../secret", &e);
	report(e == -EINVAL, "slash-refused");
	u64 l = lookup(d, ROOT, "etc", &e);
	report(l && (entry_mode() & S_IFMT) == S_IFLNK, "link-is-a-link");
	report(call(d, READLINK, l, NULL, 0, NULL, NULL) == 0 && body_is("/etc"), "readlink");
	report(read_file(d, l, 100) != 0, "link-not-opened");
	lookup(d, l, "passwd", &e);
	report(e != 0, "link-not-followed");
	if (null) {
		u64 n = lookup(d, ROOT, "null", &e);
		report(n && read_file(d, n, 100) == -EACCES, "device-not-opened");
	}
	u32 create[4] = { 01101, 0100644, 022, 0 };
	int c = call(d, CREATE, ROOT, create, sizeof(create), "from-guest", NULL);
	u64 f = c ? 0 : *(u64 *)body;
	if (ro) {
		u32 mkdir[2] = { 0755, 022 };
		report(c == -EROFS, "ro-create-refused");
		report(call(d, MKDIR, ROOT, mkdir, sizeof(mkdir), "dir", NULL) == -EROFS,
		       "ro-mkdir-refused");
		report(write_file(d, h, 0, "x") == -EROFS, "ro-write-refused");
		report(read_file(d, h, 100) == 0 && body_is(hello), "ro-unchanged");
		return;
	}
	report(c == 0, "create");
	report(write_file(d, f, 0, "written by the guest\n") == 0 && *(u32 *)body == 21, "write");
	/* The host's first disk, sda (8:0). */
	u32 blk[4] = { S_IFBLK | 0600, (8 << 8) | 0, 022, 0 };
	report(call(d, MKNOD, ROOT, blk, sizeof(blk), "disk", NULL) == -EPERM,
	       "mknod-device-refused");
	u32 fifo[4] = { S_IFIFO | 0644, 0, 022, 0 };
	report(call(d, MKNOD, ROOT, fifo, sizeof(fifo), "fifo", NULL) == 0, "mknod-fifo");
}

static bool bring_up(struct virtio_dev *d, const char *t)
{
	bool up;
	if (!strncmp(t, "mmio", 5)) {
		u64 base = virtio_mmio_from_dsdt();
		report(base != 0, "dsdt-lnro0005");
		up = base && virtio_mmio_init(d, base, 26);
	} else {
		int bdf = pci_find(0x1af4, 0x105a);
		report(bdf >= 0, "pci-1af4-105a");
		up = bdf >= 0 && virtio_pci_init(d, bdf, 26, 0xffff);
	}
	report(up, "%s-virtio-init", t);
	return up;
}

int main(void)
{
	const char *t = arg_str("transport=");
	const char *mode = arg_str("mode=");
	const char *tag = arg_str("tag=");
	if (!t || (strncmp(t, "pci", 4) && strncmp(t, "mmio", 5)) || !tag) {
		printf("bad arguments: transport=pci|mmio tag=T [mode=rw|ro] [null] [wait]\n");
		exit(EXIT_BAD_ARGS);
	}
	bool ro = mode && !strncmp(mode, "ro", 3);
	struct virtio_dev d;
	if (!bring_up(&d, t))
		return report_summary();
	check_share(&d, tag, ro, arg_str("null") != NULL);
	if (arg_str("wait")) {
		int e;
		u64 h = lookup(&d, ROOT, "hello", &e);
		struct io_in r = { .size = 100 };
		offer(build(READ, h, &r, sizeof(r), NULL, NULL));
		printf("waiting for a key\n");
		while (!(inb(0x3fd) & 1))
			;
		printf("key: %c\n", inb(0x3f8));
		virtio_notify(&d);
		virtio_wait_used(&d);
		report(out->error == 0 && body_is(hello), "after-restore-read-in-flight");
		report(read_file(&d, h, 100) == 0 && body_is(hello), "after-restore-read");
		if (!ro) {
			u64 f = lookup(&d, ROOT, "from-guest", &e);
			report(write_file(&d, f, 21, "after the key\n") == 0, "after-restore-write");
		}
	}
	return report_summary();
}
