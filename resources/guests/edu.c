/*
 * QEMU's edu device from inside: find it, read its ID, check liveness,
 * compute a factorial, DMA a buffer to the device and back, take its
 * interrupt over INTx (IOAPIC, level) and MSI, and see a DMA outside RAM
 * complete without moving bytes. Needs `--edu`; with the argument "q35"
 * (and `--machine q35`) it also checks the chipset's identities.
 *
 * With `wait`, the guest instead does half its work, waits for a key on
 * COM1 (a test snapshots the VM there) and does the rest: before the key
 * it enables MSI, takes a factorial's MSI, DMAs a pattern into the whole
 * 4 KiB buffer and raises an interrupt with interrupts off; after it, it
 * finds the registers as it left them, takes the pending interrupt, DMAs
 * the buffer back and takes another factorial's MSI, so a restored VM
 * passes only with the device's registers, buffer, interrupt status and
 * MSI route restored. The machine's identity is checked again after the
 * key: a restored q35 VM must still be one.
 */
#include "guest.h"

#define EDU_ID 0x00
#define EDU_ALIVE 0x04
#define EDU_FACT 0x08
#define EDU_STATUS 0x20
#define EDU_INTR_STATUS 0x24
#define EDU_INTR_RAISE 0x60
#define EDU_INTR_ACK 0x64
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_COUNT 0x90
#define EDU_DMA_CMD 0x98
#define DMA_START 1u
#define DMA_TO_RAM 2u
#define DMA_IRQ 4u
#define DMA_BUF 0x40000ul
#define STATUS_IRQ_FACT 0x80u

#define INTX_VEC 0x51
#define MSI_VEC 0x52
#define REDIR_LO(gsi) (0x10 + 2 * (gsi))
#define REDIR_HI(gsi) (0x11 + 2 * (gsi))
#define REDIR_LEVEL (1u << 15)
#define REDIR_MASKED (1u << 16)
#define PCI_CAP_MSI 0x05

static u64 bar;
/* The OR of the statuses handlers saw. KVM-PVM resends a level
 * interrupt once while the handler runs (see testdev.c), so an INTx may
 * be taken twice, the second time with the status already acknowledged. */
static volatile u32 intx_count, msi_count, seen;
static u8 src[64] __attribute__((aligned(64)));
static u8 dst[64] __attribute__((aligned(64)));
/* `wait`: what goes into the device's buffer before the key, and what
 * comes back after it. */
static u8 pattern[4096] __attribute__((aligned(64)));
static u8 back[4096] __attribute__((aligned(64)));

static u32 rd(u32 reg) { return mmio_read32(bar + reg); }
static void wr(u32 reg, u32 v) { mmio_write32(bar + reg, v); }
static void wrq(u32 reg, u64 v) { mmio_write64(bar + reg, v); }

/* Acknowledge what the device raised, as edu's documentation asks of
 * every handler. */
static void ack(void)
{
	u32 status = rd(EDU_INTR_STATUS);
	seen |= status;
	wr(EDU_INTR_ACK, status);
	lapic_eoi();
}

static void intx_handler(struct intr_frame *f) { (void)f; intx_count++; ack(); }
static void msi_handler(struct intr_frame *f) { (void)f; msi_count++; ack(); }

static void dma(u64 from, u64 to, u64 count, u32 cmd)
{
	wrq(EDU_DMA_SRC, from);
	wrq(EDU_DMA_DST, to);
	wrq(EDU_DMA_COUNT, count);
	wr(EDU_DMA_CMD, cmd | DMA_START);
	while (rd(EDU_DMA_CMD) & DMA_START)
		;
}

static void wait_for(volatile u32 *count, u32 want)
{
	while (*count < want)
		;
}

static void chipset(void)
{
	report(pci_read32(PCI_BDF(0, 0), 0) == 0x29c08086, "q35-mch-00.0");
	report(pci_read32(PCI_BDF(0x1f, 0), 0) == 0x29188086, "q35-lpc-1f.0");
	report(pci_read32(PCI_BDF(0x1f, 0), 8) >> 8 == 0x060100, "q35-lpc-isa-bridge");
	report(pci_ecam_base() != 0, "q35-mcfg-ecam");
}

/* MSI to this CPU at MSI_VEC, enabled; the capability's offset. */
static u8 enable_msi(int bdf)
{
	u8 cap = pci_find_cap(bdf, PCI_CAP_MSI, 0);
	if (!cap)
		return 0;
	pci_write32(bdf, cap + 4, 0xfee00000u | lapic_id() << 12);
	pci_write32(bdf, cap + 8, 0);
	pci_write16(bdf, cap + 12, MSI_VEC);
	pci_write16(bdf, cap + 2, pci_read16(bdf, cap + 2) | 1);
	return cap;
}

static u8 pat(int i) { return (u8)(i * 13 + (i >> 8) + 0x5a); }

/* The machine's host bridge: the Q35 chipset's, or the default
 * machine's generic one. */
static void machine(void)
{
	if (arg_str("q35"))
		chipset();
	else
		report(pci_read32(PCI_BDF(0, 0), 0) == 0x00081b36, "pc-host-bridge");
}

static int around_a_key(int bdf)
{
	report(rd(EDU_ID) == 0x010000ed, "edu-id");
	wr(EDU_ALIVE, 0xcafe0001);
	set_irq_handler(MSI_VEC, msi_handler);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	lapic_enable();
	u8 cap = enable_msi(bdf);
	sti();
	wr(EDU_STATUS, STATUS_IRQ_FACT);
	wr(EDU_FACT, 10);
	wait_for(&msi_count, 1);
	report(cap && seen == 0x1 && rd(EDU_FACT) == 3628800, "edu-factorial-msi");
	for (int i = 0; i < 4096; i++)
		pattern[i] = pat(i);
	dma((u64)pattern, DMA_BUF, 4096, 0);
	memset(pattern, 0, sizeof(pattern));
	/* Raised with interrupts off: the status stays in the device and
	 * the message waits in the local APIC. */
	cli();
	seen = 0;
	wr(EDU_INTR_RAISE, 0x40);
	report(msi_count == 1 && rd(EDU_INTR_STATUS) == 0x40, "edu-raise-held");

	printf("waiting for a key\n");
	while (!(inb(0x3fd) & 1))
		;
	printf("key: %c\n", inb(0x3f8));

	report(rd(EDU_ALIVE) == ~0xcafe0001u && rd(EDU_FACT) == 3628800 &&
		       rd(EDU_STATUS) == STATUS_IRQ_FACT,
	       "edu-registers-kept");
	report(rd(EDU_DMA_SRC) == (u32)(u64)pattern && rd(EDU_DMA_DST) == DMA_BUF &&
		       rd(EDU_DMA_COUNT) == 4096 && rd(EDU_DMA_CMD) == 0,
	       "edu-dma-registers-kept");
	report(rd(EDU_INTR_STATUS) == 0x40 && msi_count == 1, "edu-status-kept");
	sti();
	wait_for(&msi_count, 2);
	report(seen == 0x40 && rd(EDU_INTR_STATUS) == 0, "edu-held-msi-taken");
	seen = 0;
	dma(DMA_BUF, (u64)back, 4096, DMA_TO_RAM | DMA_IRQ);
	wait_for(&msi_count, 3);
	bool same = seen == 0x100;
	for (int i = 0; i < 4096; i++)
		same = same && back[i] == pat(i);
	report(same, "edu-buffer-kept");
	/* The status register still asks for the factorial's interrupt. */
	seen = 0;
	wr(EDU_FACT, 12);
	wait_for(&msi_count, 4);
	report(seen == 0x1 && rd(EDU_FACT) == 479001600 && msi_count == 4 && intx_count == 0,
	       "edu-factorial-msi-after");
	machine();
	return report_summary();
}

int main(void)
{
	if (arg_str("q35"))
		chipset();
	int bdf = pci_find(0x1234, 0x11e8);
	report(bdf >= 0, "edu-found");
	if (bdf < 0)
		return report_summary();
	pci_write16(bdf, PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
	bar = pci_read32(bdf, PCI_BAR0) & ~0xful;
	printf("edu at 00:%02x.0, BAR 0 at 0x%lx\n", bdf >> 3, bar);
	if (arg_str("wait"))
		return around_a_key(bdf);

	report(rd(EDU_ID) == 0x010000ed, "edu-id");
	wr(EDU_ALIVE, 0x12345678);
	report(rd(EDU_ALIVE) == ~0x12345678u, "edu-alive");
	wr(EDU_FACT, 10);
	while (rd(EDU_STATUS) & 1)
		;
	report(rd(EDU_FACT) == 3628800, "edu-factorial");

	for (int i = 0; i < 64; i++)
		src[i] = (u8)(i * 7 + 3);
	dma((u64)src, DMA_BUF + 128, 64, 0);
	dma(DMA_BUF + 128, (u64)dst, 64, DMA_TO_RAM);
	report(!memcmp(src, dst, 64), "edu-dma-round-trip");

	/* INTx: the interrupt line register names the IOAPIC pin. */
	u8 gsi = pci_read8(bdf, 0x3c);
	printf("INTx on GSI %u\n", gsi);
	set_irq_handler(INTX_VEC, intx_handler);
	set_irq_handler(MSI_VEC, msi_handler);
	/* The PIC stays at the vectors the BIOS left (0x08: the PIT), so mask it. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	lapic_enable();
	ioapic_write(REDIR_HI(gsi), lapic_id() << 24);
	ioapic_write(REDIR_LO(gsi), INTX_VEC | REDIR_LEVEL);
	sti();
	memset(dst, 0, sizeof(dst));
	dma(DMA_BUF + 128, (u64)dst, 64, DMA_TO_RAM | DMA_IRQ);
	wait_for(&intx_count, 1);
	report(seen == 0x100 && !memcmp(src, dst, 64), "edu-dma-intx");
	seen = 0;
	u32 before = intx_count;
	wr(EDU_STATUS, STATUS_IRQ_FACT);
	wr(EDU_FACT, 5);
	wait_for(&intx_count, before + 1);
	report(seen == 0x1 && rd(EDU_FACT) == 120, "edu-factorial-intx");
	wr(EDU_STATUS, 0);
	report(rd(EDU_INTR_STATUS) == 0, "edu-intr-acknowledged");

	/* MSI: INTx goes quiet, every raise is one message. */
	u8 cap = enable_msi(bdf);
	report(cap && (pci_read16(bdf, cap + 2) & 0x80), "edu-msi-64-bit");
	before = intx_count;
	seen = 0;
	wr(EDU_INTR_RAISE, 0x20);
	wait_for(&msi_count, 1);
	report(seen == 0x20 && msi_count == 1 && intx_count == before, "edu-msi");

	/* A DMA from far beyond RAM: it completes, nothing moves. */
	seen = 0;
	dma(1ul << 40, DMA_BUF + 128, 64, DMA_IRQ);
	wait_for(&msi_count, 2);
	memset(dst, 0, sizeof(dst));
	dma(DMA_BUF + 128, (u64)dst, 64, DMA_TO_RAM);
	report(seen == 0x100 && !memcmp(src, dst, 64), "edu-dma-outside-ram");
	return report_summary();
}
