/*
 * PCI from inside: enumerate bus 0 through 0xCF8/0xCFC and through ECAM
 * (found in the ACPI MCFG) and compare, size BAR 0 of the virtio-rng
 * function and move it, then enable MSI-X and take an interrupt from a
 * virtio request. Needs `--rng` (virtio-rng on virtio-pci).
 */
#include "guest.h"

#define MSI_VECTOR 0x50
#define NEW_BAR 0xc0100000ul

static volatile u32 msi_count;

static void msi_handler(struct intr_frame *f)
{
	(void)f;
	msi_count++;
	lapic_eoi();
}

static int enumerate(void)
{
	int found = 0;
	bool bridge = false;
	for (int dev = 0; dev < 32; dev++) {
		u32 id = pci_read32(PCI_BDF(dev, 0), 0);
		if (id == 0xffffffff)
			continue;
		u32 class = pci_read32(PCI_BDF(dev, 0), 8) >> 8;
		printf("00:%02x.0 %04x:%04x class %06x\n", dev, id & 0xffff, id >> 16, class);
		found++;
		if (dev == 0 && id == 0x00081b36 && class == 0x060000)
			bridge = true;
	}
	report(bridge, "host-bridge-00.0");
	return found;
}

static void compare_ecam(int found)
{
	u64 ecam = pci_ecam_base();
	printf("ECAM at 0x%lx\n", ecam);
	report(ecam != 0, "mcfg-ecam");
	if (!ecam)
		return;
	bool same = true;
	int seen = 0;
	for (int dev = 0; dev < 32; dev++) {
		u16 bdf = PCI_BDF(dev, 0);
		if (ecam_read32(ecam, bdf, 0) != 0xffffffff)
			seen++;
		for (u16 reg = 0; reg < 0x100; reg += 4)
			same &= ecam_read32(ecam, bdf, reg) == pci_read32(bdf, reg);
	}
	report(same && seen == found, "ecam-matches-cf8");
}

/* Size BAR 0 (64-bit) with decoding off, as an OS does. */
static u64 size_bar0(u16 bdf)
{
	u16 cmd = pci_read16(bdf, PCI_COMMAND);
	pci_write16(bdf, PCI_COMMAND, cmd & ~PCI_COMMAND_MEMORY);
	u32 lo = pci_read32(bdf, PCI_BAR0), hi = pci_read32(bdf, PCI_BAR0 + 4);
	pci_write32(bdf, PCI_BAR0, 0xffffffff);
	pci_write32(bdf, PCI_BAR0 + 4, 0xffffffff);
	u64 mask = (u64)pci_read32(bdf, PCI_BAR0 + 4) << 32 | (pci_read32(bdf, PCI_BAR0) & ~0xfu);
	pci_write32(bdf, PCI_BAR0, lo);
	pci_write32(bdf, PCI_BAR0 + 4, hi);
	pci_write16(bdf, PCI_COMMAND, cmd);
	report((lo & 0x6) == 0x4, "bar0-is-64-bit");
	return ~mask + 1;
}

static void move_bar0(u16 bdf, u64 old)
{
	/* num_queues in the common configuration at BAR 0 + 0x12. */
	report(mmio_read16(old + 0x12) == 1, "bar0-decodes-at-firmware-address");
	pci_write16(bdf, PCI_COMMAND, pci_read16(bdf, PCI_COMMAND) & ~PCI_COMMAND_MEMORY);
	pci_write32(bdf, PCI_BAR0, (u32)NEW_BAR);
	pci_write32(bdf, PCI_BAR0 + 4, 0);
	pci_write16(bdf, PCI_COMMAND, pci_read16(bdf, PCI_COMMAND) | PCI_COMMAND_MEMORY);
	report(pci_bar64(bdf, 0) == NEW_BAR, "bar0-reads-back-moved");
	report(mmio_read16(NEW_BAR + 0x12) == 1, "bar0-decodes-at-new-address");
	report(mmio_read32(old + 0x12) == 0xffffffff, "old-address-floats");
}

static void msix(u16 bdf)
{
	u8 cap = pci_find_cap(bdf, PCI_CAP_MSIX, 0);
	report(cap != 0, "msix-capability");
	if (!cap)
		return;
	u16 ctrl = pci_read16(bdf, cap + 2);
	u32 table = pci_read32(bdf, cap + 4);
	printf("MSI-X: %u vectors, table BAR %u + 0x%x\n", (ctrl & 0x7ff) + 1, table & 7, table & ~7u);
	u64 t = pci_bar64(bdf, table & 7) + (table & ~7u);
	/* Vector 0: fixed delivery to APIC ID 0, unmasked. */
	mmio_write32(t + 0, 0xfee00000 | lapic_id() << 12);
	mmio_write32(t + 4, 0);
	mmio_write32(t + 8, MSI_VECTOR);
	mmio_write32(t + 12, 0);
	pci_write16(bdf, cap + 2, ctrl | 0x8000);
	report(pci_read16(bdf, cap + 2) & 0x8000, "msix-enabled");

	outb(0x21, 0xff); /* mask the PICs: only the MSI may interrupt */
	outb(0xa1, 0xff);
	set_irq_handler(MSI_VECTOR, msi_handler);
	lapic_enable();
	sti();
	struct virtio_dev d;
	static u8 buf[32];
	if (!virtio_pci_init(&d, bdf, 4, 0)) {
		report(false, "virtio-pci-init");
		return;
	}
	int n = virtio_request(&d, buf, sizeof(buf));
	printf("virtio-rng gave %d bytes\n", n);
	report(n == (int)sizeof(buf), "virtio-request-done");
	while (!msi_count)
		;
	printf("MSI-X interrupts: %u\n", msi_count);
	report(msi_count == 1, "msix-interrupt-taken");
	cli();
}

int main(void)
{
	int found = enumerate();
	compare_ecam(found);
	int bdf = pci_find(0x1af4, 0x1044);
	report(bdf >= 0, "virtio-rng-found");
	if (bdf < 0)
		return report_summary();
	u64 old = pci_bar64(bdf, 0);
	u64 size = size_bar0(bdf);
	printf("BAR 0 at 0x%lx, size 0x%lx\n", old, size);
	report(size == 0x8000, "bar0-size");
	move_bar0(bdf, old);
	msix(bdf);
	return report_summary();
}
