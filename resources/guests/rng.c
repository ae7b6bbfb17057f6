/*
 * Read random bytes from virtio-rng with the library's polling driver:
 * `transport=pci` (the first 1af4:1044 function) or `transport=mmio` (the
 * window the DSDT announces as LNRO0005). With `wait`, also wait for a
 * key on COM1 between two reads, so a test can snapshot and restore the
 * VM there.
 */
#include "guest.h"

static bool read_some(struct virtio_dev *d, const char *name)
{
	static u8 a[16], b[16];
	memset(a, 0, sizeof(a));
	memset(b, 0, sizeof(b));
	int n = virtio_request(d, a, sizeof(a));
	int m = virtio_request(d, b, sizeof(b));
	bool nonzero = false;
	for (unsigned i = 0; i < sizeof(a); i++)
		nonzero |= a[i] != 0;
	printf("%s: %d and %d bytes:", name, n, m);
	for (unsigned i = 0; i < 8; i++)
		printf(" %02x", a[i]);
	printf("\n");
	bool ok = n == 16 && m == 16 && nonzero && memcmp(a, b, sizeof(a));
	report(ok, "%s", name);
	return ok;
}

int main(void)
{
	const char *t = arg_str("transport=");
	struct virtio_dev d;
	bool up = false;
	if (t && !strncmp(t, "mmio", 5)) {
		u64 base = virtio_mmio_from_dsdt();
		printf("virtio-mmio window from the DSDT: 0x%lx\n", base);
		report(base != 0, "dsdt-lnro0005");
		up = base && virtio_mmio_init(&d, base, 4);
	} else if (t && !strncmp(t, "pci", 4)) {
		int bdf = pci_find(0x1af4, 0x1044);
		report(bdf >= 0, "pci-1af4-1044");
		up = bdf >= 0 && virtio_pci_init(&d, bdf, 4, 0xffff);
	} else {
		printf("bad argument: transport=pci|mmio\n");
		exit(EXIT_BAD_ARGS);
	}
	report(up, "virtio-init");
	if (!up)
		return report_summary();
	read_some(&d, "random-before");
	if (arg_str("wait")) {
		printf("waiting for a key\n");
		while (!(inb(0x3fd) & 1))
			;
		printf("key: %c\n", inb(0x3f8));
		read_some(&d, "random-after");
	}
	return report_summary();
}
