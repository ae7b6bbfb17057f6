/*
 * Drive a virtio-blk disk with the library's polling driver:
 * `transport=pci` (the first 1af4:1042 function), `transport=mmio` (the
 * first LNRO0005 window of the DSDT) or `transport=both` (one of each).
 * The host's image holds 512-byte sectors, sector s filled with byte s
 * (mod 256). `mode=rw|ro|snapshot` says what the disk should allow:
 *
 * - every mode: capacity, GET_ID, sector reads, a read beyond the end
 *   refused (IOERR), an unknown request type refused (UNSUPP);
 * - rw and snapshot: sectors 16-23 written (byte 0xc0 + n), flushed and
 *   read back; 32-35 written as zeros (WRITE_ZEROES) and 40-47 discarded,
 *   both read back as zeros;
 * - ro: VIRTIO_BLK_F_RO offered, and every write, WRITE_ZEROES and
 *   DISCARD refused with IOERR, the sectors unchanged.
 *
 * With `wait`, wait for a key on COM1 afterwards (a test snapshots and
 * restores the VM there), then check sectors 16-23 again and write
 * sectors 24-31 (byte 0xd0 + n).
 */
#include "guest.h"

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2

#define F_RO (1u << 5)
#define F_BLK_SIZE (1u << 6)
#define F_FLUSH (1u << 9)
#define F_DISCARD (1u << 13)
#define F_WRITE_ZEROES (1u << 14)

static struct {
	u32 type, reserved;
	u64 sector;
} hdr __attribute__((aligned(16)));
static u8 data[4096] __attribute__((aligned(4096)));
static volatile u8 status;

/* One request: header, one data buffer (none if `len` is 0), status.
 * The status byte, or 0xff if the device wrote none. */
static u8 request(struct virtio_dev *d, u32 type, u64 sector, u32 len, bool to_guest)
{
	struct virtio_desc ds[3];
	u16 n = 0;
	hdr.type = type;
	hdr.reserved = 0;
	hdr.sector = sector;
	status = 0xff;
	ds[n] = (struct virtio_desc){ (u64)&hdr, sizeof(hdr), VIRTQ_DESC_F_NEXT, n + 1 };
	n++;
	if (len) {
		u16 f = VIRTQ_DESC_F_NEXT | (to_guest ? VIRTQ_DESC_F_WRITE : 0);
		ds[n] = (struct virtio_desc){ (u64)data, len, f, n + 1 };
		n++;
	}
	ds[n] = (struct virtio_desc){ (u64)&status, 1, VIRTQ_DESC_F_WRITE, 0 };
	n++;
	virtio_offer_raw(d, ds, n, 0, 1);
	virtio_wait_used(d);
	return status;
}

/* Read `count` sectors from `first`: each filled with want(sector). */
static bool sectors_are(struct virtio_dev *d, u64 first, u32 count, u8 (*want)(u64))
{
	if (request(d, T_IN, first, count * 512, true) != S_OK)
		return false;
	for (u32 s = 0; s < count; s++)
		for (u32 i = 0; i < 512; i++)
			if (data[s * 512 + i] != want(first + s)) {
				printf("sector %lu byte %u: 0x%x, want 0x%x\n", first + s, i,
				       data[s * 512 + i], want(first + s));
				return false;
			}
	return true;
}

static u8 original(u64 s) { return (u8)s; }
static u8 written(u64 s) { return (u8)(0xc0 + s - 16); }
static u8 written_after(u64 s) { return (u8)(0xd0 + s - 24); }
static u8 zero(u64 s) { (void)s; return 0; }

/* Fill sectors [first, first + count) with fill(sector); the status. */
static u8 write_sectors(struct virtio_dev *d, u64 first, u32 count, u8 (*fill)(u64))
{
	for (u32 s = 0; s < count; s++)
		memset(data + s * 512, fill(first + s), 512);
	return request(d, T_OUT, first, count * 512, false);
}

/* One DISCARD or WRITE_ZEROES segment; the status. */
static u8 zero_sectors(struct virtio_dev *d, u32 type, u64 sector, u32 count)
{
	struct {
		u64 sector;
		u32 count, flags;
	} seg = { sector, count, 0 };
	memcpy(data, &seg, sizeof(seg));
	return request(d, type, 0, sizeof(seg), false);
}

static void check_disk(struct virtio_dev *d, const char *t, const char *mode)
{
	bool ro = !strncmp(mode, "ro", 3);
	u64 cap = mmio_read32(d->device) | (u64)mmio_read32(d->device + 4) << 32;
	printf("%s: capacity %lu sectors, features 0x%x\n", t, cap, d->features);
	report(cap >= 64, "%s-capacity", t);
	report(!!(d->features & F_RO) == ro, "%s-ro-feature", t);
	memset(data, 0, 32);
	u8 st = request(d, T_GET_ID, 0, 20, true);
	data[20] = 0;
	printf("%s: id '%s'\n", t, (char *)data);
	report(st == S_OK && data[0], "%s-get-id", t);
	report(sectors_are(d, 0, 8, original), "%s-read", t);
	report(request(d, T_IN, cap, 512, true) == S_IOERR, "%s-beyond-end-refused", t);
	report(request(d, 0x7777, 0, 0, false) == S_UNSUPP, "%s-unknown-type-unsupported", t);
	if (ro) {
		report(write_sectors(d, 16, 8, written) == S_IOERR, "%s-ro-write-refused", t);
		report(zero_sectors(d, T_WRITE_ZEROES, 32, 4) == S_IOERR, "%s-ro-zeroes-refused", t);
		report(zero_sectors(d, T_DISCARD, 40, 8) == S_IOERR, "%s-ro-discard-refused", t);
		report(sectors_are(d, 16, 8, original), "%s-ro-unchanged", t);
		return;
	}
	report(write_sectors(d, 16, 8, written) == S_OK, "%s-write", t);
	report(request(d, T_FLUSH, 0, 0, false) == S_OK, "%s-flush", t);
	report(sectors_are(d, 16, 8, written), "%s-read-back", t);
	report(zero_sectors(d, T_WRITE_ZEROES, 32, 4) == S_OK, "%s-write-zeroes", t);
	report(sectors_are(d, 32, 4, zero) && sectors_are(d, 36, 1, original),
	       "%s-write-zeroes-read", t);
	report(zero_sectors(d, T_DISCARD, 40, 8) == S_OK, "%s-discard", t);
	report(sectors_are(d, 40, 8, zero) && sectors_are(d, 48, 1, original), "%s-discard-read",
	       t);
}

static bool bring_up(struct virtio_dev *d, const char *t)
{
	virtio_want_features(F_RO | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES);
	bool up;
	if (!strncmp(t, "mmio", 5)) {
		u64 base = virtio_mmio_from_dsdt();
		report(base != 0, "dsdt-lnro0005");
		up = base && virtio_mmio_init(d, base, 2);
	} else {
		int bdf = pci_find(0x1af4, 0x1042);
		report(bdf >= 0, "pci-1af4-1042");
		up = bdf >= 0 && virtio_pci_init(d, bdf, 2, 0xffff);
	}
	report(up, "%s-virtio-init", t);
	return up;
}

int main(void)
{
	const char *t = arg_str("transport=");
	const char *mode = arg_str("mode=");
	if (!mode)
		mode = "rw";
	const char *names[2];
	int n = 0;
	if (t && !strncmp(t, "both", 5)) {
		names[n++] = "pci";
		names[n++] = "mmio";
	} else if (t && (!strncmp(t, "pci", 4) || !strncmp(t, "mmio", 5))) {
		names[n++] = t;
	} else {
		printf("bad argument: transport=pci|mmio|both\n");
		exit(EXIT_BAD_ARGS);
	}
	struct virtio_dev d;
	for (int i = 0; i < n; i++)
		if (bring_up(&d, names[i]))
			check_disk(&d, names[i], mode);
	if (arg_str("wait") && n == 1) {
		printf("waiting for a key\n");
		while (!(inb(0x3fd) & 1))
			;
		printf("key: %c\n", inb(0x3f8));
		report(sectors_are(&d, 16, 8, written), "after-restore-read");
		report(write_sectors(&d, 24, 8, written_after) == S_OK, "after-restore-write");
		report(sectors_are(&d, 24, 8, written_after), "after-restore-read-back");
	}
	return report_summary();
}
