/* PCI configuration access and ACPI table lookup for the test guests. */
#include "guest.h"

#define CONFIG_ADDRESS 0xcf8
#define CONFIG_DATA 0xcfc

static void select(u16 bdf, u16 reg)
{
	outl(CONFIG_ADDRESS, 0x80000000u | (u32)bdf << 8 | (reg & 0xfc));
}

u32 pci_read32(u16 bdf, u16 reg) { select(bdf, reg); return inl(CONFIG_DATA); }
void pci_write32(u16 bdf, u16 reg, u32 v) { select(bdf, reg); outl(CONFIG_DATA, v); }
u16 pci_read16(u16 bdf, u16 reg) { select(bdf, reg); return inw(CONFIG_DATA + (reg & 2)); }
void pci_write16(u16 bdf, u16 reg, u16 v) { select(bdf, reg); outw(CONFIG_DATA + (reg & 2), v); }
u8 pci_read8(u16 bdf, u16 reg) { select(bdf, reg); return inb(CONFIG_DATA + (reg & 3)); }

struct sdt {
	char sig[4];
	u32 length;
	u8 revision, checksum;
	char oem[6], oem_table[8];
	u32 oem_rev, creator, creator_rev;
} __attribute__((packed));

void *acpi_find(const char *sig)
{
	u64 rsdp = 0;
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (!memcmp((void *)a, "RSD PTR ", 8)) {
			rsdp = a;
			break;
		}
	if (!rsdp)
		return NULL;
	u8 rev = *(u8 *)(rsdp + 15);
	u64 root;
	int width;
	if (rev >= 2) {
		memcpy(&root, (void *)(rsdp + 24), 8);
		width = 8;
	} else {
		u32 r;
		memcpy(&r, (void *)(rsdp + 16), 4);
		root = r;
		width = 4;
	}
	struct sdt *t = (struct sdt *)root;
	u32 n = (t->length - sizeof(*t)) / width;
	for (u32 i = 0; i < n; i++) {
		u64 e = 0;
		memcpy(&e, (u8 *)t + sizeof(*t) + i * width, width);
		if (!memcmp((void *)e, sig, 4))
			return (void *)e;
		/* The DSDT hangs off the FADT. */
		if (!memcmp(sig, "DSDT", 4) && !memcmp((void *)e, "FACP", 4)) {
			u32 dsdt;
			memcpy(&dsdt, (u8 *)e + 40, 4);
			return (void *)(u64)dsdt;
		}
	}
	return NULL;
}

u64 pci_ecam_base(void)
{
	u8 *mcfg = acpi_find("MCFG");
	if (!mcfg)
		return 0;
	u64 base;
	memcpy(&base, mcfg + 44, 8);
	return base;
}

u32 ecam_read32(u64 ecam, u16 bdf, u16 reg)
{
	return mmio_read32(ecam + ((u64)bdf << 12) + reg);
}

u8 pci_find_cap(u16 bdf, u8 id, u8 from)
{
	u8 at = from ? pci_read8(bdf, from + 1) : pci_read8(bdf, 0x34);
	for (int n = 0; at && n < 48; n++) {
		if (pci_read8(bdf, at) == id)
			return at;
		at = pci_read8(bdf, at + 1);
	}
	return 0;
}

int pci_find(u16 vendor, u16 device)
{
	for (int dev = 0; dev < 32; dev++) {
		u32 id = pci_read32(PCI_BDF(dev, 0), 0);
		if ((id & 0xffff) == vendor && id >> 16 == device)
			return PCI_BDF(dev, 0);
	}
	return -1;
}

u64 pci_bar64(u16 bdf, int bar)
{
	u64 lo = pci_read32(bdf, PCI_BAR0 + 4 * bar) & ~0xfull;
	u64 hi = pci_read32(bdf, PCI_BAR0 + 4 * bar + 4);
	return hi << 32 | lo;
}
