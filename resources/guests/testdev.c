/*
 * Exercise QEMU's pc-testdev: the scratch I/O port, the iomem MMIO buffer
 * and the IRQ lines, delivered through the IOAPIC to the LAPIC.
 *
 * With `wait`, the guest stops for a key on COM1 while a level interrupt
 * is in flight (IOAPIC Remote IRR set, the vector pending in the LAPIC,
 * IF=0), so a snapshot taken there must carry both controllers' state.
 */
#include "guest.h"

#define SCRATCH 0xe0
#define IOMEM 0xff000000ul
#define IOMEM_SIZE 0x10000
#define IRQ_LINE(n) (0x2000 + (n))
#define COM1 0x3f8
#define LSR_DR 0x01

#define EDGE_GSI 14
#define EDGE_VEC 0x40
#define LEVEL_GSI 15
#define LEVEL_VEC 0x41

#define REDIR_LO(gsi) (0x10 + 2 * (gsi))
#define REDIR_HI(gsi) (0x11 + 2 * (gsi))
#define REDIR_LEVEL (1u << 15)
#define REDIR_REMOTE_IRR (1u << 14)
#define REDIR_MASKED (1u << 16)

static void test_scratch(void)
{
	outl(SCRATCH, 0x12345678);
	report(inl(SCRATCH) == 0x12345678, "scratch-32");
	/* Narrow reads at 0xe0+o return bytes o.. of the register (little-endian lanes). */
	report(inb(SCRATCH) == 0x78 && inb(SCRATCH + 1) == 0x56 && inb(SCRATCH + 2) == 0x34 &&
		       inb(SCRATCH + 3) == 0x12,
	       "scratch-read-bytes");
	report(inw(SCRATCH) == 0x5678 && inw(SCRATCH + 2) == 0x1234, "scratch-read-words");
	/* Narrow writes replace only their own lanes. */
	outb(SCRATCH + 1, 0xab);
	report(inl(SCRATCH) == 0x1234ab78, "scratch-write-byte");
	outw(SCRATCH + 2, 0xcdef);
	report(inl(SCRATCH) == 0xcdefab78, "scratch-write-word");
	outb(SCRATCH + 3, 0x01);
	outb(SCRATCH, 0x02);
	report(inl(SCRATCH) == 0x01efab02, "scratch-write-lanes");
}

/* Write a pattern of each width, read it back whole and byte by byte. */
static bool iomem_check(u32 off, int width, u64 pattern)
{
	u64 a = IOMEM + off, got;
	u64 mask = width == 8 ? ~0ull : (1ull << (8 * width)) - 1;
	pattern &= mask;
	switch (width) {
	case 1: mmio_write8(a, pattern); got = mmio_read8(a); break;
	case 2: mmio_write16(a, pattern); got = mmio_read16(a); break;
	case 4: mmio_write32(a, pattern); got = mmio_read32(a); break;
	default: mmio_write64(a, pattern); got = mmio_read64(a); break;
	}
	bool ok = got == pattern;
	for (int i = 0; i < width; i++)
		ok &= mmio_read8(a + i) == ((pattern >> (8 * i)) & 0xff);
	if (!ok)
		printf("iomem: width %d at 0x%x wrote 0x%lx read 0x%lx\n", width, off, pattern, got);
	return ok;
}

static void test_iomem(void)
{
	static const u32 offsets[] = { 0x0, 0x8, 0x1000, 0x7ff0, 0xfff0 };
	static const int widths[] = { 1, 2, 4, 8 };
	for (unsigned w = 0; w < 4; w++) {
		int width = widths[w];
		bool ok = true;
		for (unsigned o = 0; o < sizeof(offsets) / sizeof(offsets[0]); o++) {
			ok &= iomem_check(offsets[o], width, 0x8877665544332211ull + o);
			ok &= iomem_check(offsets[o], width, ~0x0123456789abcdefull);
		}
		/* The very last bytes of the buffer. */
		ok &= iomem_check(IOMEM_SIZE - width, width, 0xa5b6c7d8e9fa0b1cull);
		report(ok, "iomem-width-%d", width);
	}
	/* Narrow writes into a wide value keep the other bytes. */
	mmio_write64(IOMEM + 0x100, 0x1111111111111111ull);
	mmio_write8(IOMEM + 0x101, 0x22);
	mmio_write16(IOMEM + 0x104, 0x3344);
	report(mmio_read64(IOMEM + 0x100) == 0x1111334411112211ull, "iomem-mixed-widths");
}

static volatile u32 edge_count, level_count;
static volatile bool lower_in_handler;

static void edge_handler(struct intr_frame *f)
{
	(void)f;
	edge_count++;
	lapic_eoi();
}

static void level_handler(struct intr_frame *f)
{
	(void)f;
	level_count++;
	/* Lower the line before EOI, or the IOAPIC delivers it again at once. */
	if (lower_in_handler)
		outb(IRQ_LINE(LEVEL_GSI), 0);
	lapic_eoi();
}

/* Spin a while so that an extra delivery, if any, shows; a late one goes
 * unseen, so this never fails a correct VMM. */
static void settle(void)
{
	for (u64 t = rdtsc(); rdtsc() - t < SHORT_SPIN_CYCLES;)
		;
}

/* Wait until *count reaches want, then a little longer to catch extra deliveries. */
static u32 wait_count(volatile u32 *count, u32 want)
{
	while (*count < want)
		;
	settle();
	return *count;
}

/* Poll COM1 for one byte. */
static char wait_key(void)
{
	while (!(inb(COM1 + 5) & LSR_DR))
		;
	return inb(COM1);
}

static void redirect(int gsi, u32 lo)
{
	ioapic_write(REDIR_HI(gsi), 0 << 24); /* physical destination: APIC ID 0 */
	ioapic_write(REDIR_LO(gsi), lo);
}

static void test_irqs(void)
{
	outb(0x21, 0xff); /* mask the PICs: interrupts come through the IOAPIC only */
	outb(0xa1, 0xff);
	lapic_enable();
	set_irq_handler(EDGE_VEC, edge_handler);
	set_irq_handler(LEVEL_VEC, level_handler);
	outb(IRQ_LINE(EDGE_GSI), 0);
	outb(IRQ_LINE(LEVEL_GSI), 0);
	/* Fixed delivery, physical destination, active high. */
	redirect(EDGE_GSI, EDGE_VEC);
	redirect(LEVEL_GSI, LEVEL_VEC | REDIR_LEVEL);
	sti();

	/* A rising edge gives one interrupt; holding the line high gives no more. */
	outb(IRQ_LINE(EDGE_GSI), 1);
	u32 n = wait_count(&edge_count, 1);
	outb(IRQ_LINE(EDGE_GSI), 0);
	printf("edge interrupts after first pulse: %u\n", n);
	report(n == 1, "irq-edge-once");
	outb(IRQ_LINE(EDGE_GSI), 1);
	outb(IRQ_LINE(EDGE_GSI), 0);
	n = wait_count(&edge_count, 2);
	printf("edge interrupts after second pulse: %u\n", n);
	report(n == 2, "irq-edge-again");

	/*
	 * Level, line pulsed while IF=0: the IOAPIC latches it (Remote IRR set),
	 * and after sti it arrives once; the EOI clears Remote IRR.
	 */
	cli();
	outb(IRQ_LINE(LEVEL_GSI), 1);
	report(ioapic_read(REDIR_LO(LEVEL_GSI)) & REDIR_REMOTE_IRR, "irq-level-remote-irr-set");
	if (arg_str("wait")) {
		printf("waiting for a key\n");
		printf("key: %c\n", wait_key());
	}
	outb(IRQ_LINE(LEVEL_GSI), 0);
	sti();
	n = wait_count(&level_count, 1);
	printf("level interrupts after pulse: %u\n", n);
	report(n == 1, "irq-level-once");
	report(!(ioapic_read(REDIR_LO(LEVEL_GSI)) & REDIR_REMOTE_IRR), "irq-level-remote-irr-clear");

	/*
	 * Level, line held high until the handler lowers it. Hardware KVM
	 * delivers once; KVM-PVM acts as if the EOI came at delivery time, so
	 * the IOAPIC resends while the line is still high and the handler runs
	 * twice. Accept both, but no interrupt storm once the line is low.
	 */
	level_count = 0;
	lower_in_handler = true;
	outb(IRQ_LINE(LEVEL_GSI), 1);
	n = wait_count(&level_count, 1);
	settle();
	u32 later = level_count;
	printf("level interrupts with the line held: %u\n", later);
	report(n >= 1 && n <= 2 && later == n, "irq-level-held");
	report(!(ioapic_read(REDIR_LO(LEVEL_GSI)) & REDIR_REMOTE_IRR), "irq-level-held-remote-irr-clear");

	cli();
	redirect(EDGE_GSI, REDIR_MASKED);
	redirect(LEVEL_GSI, REDIR_MASKED);
}

int main(void)
{
	test_scratch();
	test_iomem();
	test_irqs();
	return report_summary();
}
