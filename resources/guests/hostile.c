/*
 * A guest that does what a VMM least expects, one case per run
 * (case=NAME), so each ends with a status the VMM documents. Interrupts
 * stay off throughout: nothing a case stirs up can take the guest
 * elsewhere.
 *
 *   ports           read (1, 2, 4 bytes) and write (0x00, 0xff) every port
 *                   but isa-debug-exit's; exits 0
 *   mmio            read and write across the 32-bit MMIO gap, between RAM
 *                   and the gap, and above 4 GiB (stride=BYTES); exits 0
 *   firmware        overwrite the ACPI tables, the BIOS area, the EBDA and
 *                   the real-mode IVT (fill=BYTE); exits 0. With s3, enter
 *                   ACPI S3 afterwards: the VMM wakes the CPU at the FACS
 *                   waking vector it finds there, a HLT sled (status 0)
 *   sipi            INIT and SIPI to every APIC ID that does not exist
 *                   (rounds=N), xAPIC and, with x2APIC, x2APIC IDs; then
 *                   start the real APs, which must all come up; exits 0
 *   triple-long     triple fault in 64-bit mode on the BSP
 *   triple-protected, triple-real
 *                   triple fault on an AP (needs 2 vCPUs) started into a
 *                   stub that stays in real mode or enters 32-bit
 *                   protected mode
 *   halt            every CPU halts with interrupts off (status 0)
 *   flood           write numbered lines to COM1 as fast as possible, for
 *                   ever or lines=N of them (then exit 0)
 *   spin            loop for ever with interrupts off (only a timeout ends it)
 *   pci             (with --rng) fill virtio-rng's MSI-X table and PBA with
 *                   garbage and enable MSI-X; move its BAR onto RAM, ECAM, the
 *                   LAPIC and IOAPIC, 0 and the top of the address space; then
 *                   write 0xffffffff and 0 to every configuration register of
 *                   every function of buses 0, 1 and 255 through 0xCF8/0xCFC
 *                   and of bus 0 through ECAM; exits 0
 *   virtio          (transport=pci|mmio, with the device there) offer
 *                   virtio-rng chains that loop, leave RAM, run past its end,
 *                   are device-readable, are indirect and loop, or are longer
 *                   than the queue, each answered; then a good request; then
 *                   a head beyond the queue and an available index 1000
 *                   ahead, which may stop the queue; exits 0
 */
#include "guest.h"

#define DEBUG_EXIT 0xf4
#define COM1 0x3f8
#define PM1A_CNT 0x604
#define SLP_TYP_S3 (1u << 10)
#define SLP_EN (1u << 13)

#define ICR_ASSERT (1u << 14)
#define ICR_INIT (5u << 8)
#define ICR_STARTUP (6u << 8)
#define ICR_BUSY (1u << 12)
#define MSR_APIC_BASE 0x1b
#define APIC_BASE_X2APIC (1u << 10)
#define APIC_BASE_ENABLE (1u << 11)
#define MSR_X2APIC_ICR 0x830

/* Where the triple-fault stub runs: SIPI vector 7. */
#define STUB 0x7000

static __attribute__((noreturn)) void halt_for_good(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

static u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

/* Bring COM1 back to 8N1, no loopback, after a case wrote over it. */
static void serial_reset(void)
{
	outb(COM1 + 3, 0x03);
	outb(COM1 + 1, 0x00);
	outb(COM1 + 4, 0x03);
}

static int case_ports(void)
{
	u64 reads = 0, writes = 0;
	for (u32 p = 0; p < 0x10000; p++) {
		inb(p);
		inw(p);
		inl(p);
		reads += 3;
		if (p >= DEBUG_EXIT && p < DEBUG_EXIT + 4)
			continue;
		outb(p, 0x00);
		outb(p, 0xff);
		writes += 2;
	}
	serial_reset();
	printf("ports: %lu reads, %lu writes\n", reads, writes);
	return 0;
}

/* 2 MiB pages for one GiB of guest-physical space, mapped at its own address. */
static u64 pds[4][512] __attribute__((aligned(4096)));

/* Identity-map the GiB at `gib` (below 512 GiB) through PDPT slot `gib`. */
static void map_gib(int slot, u64 gib)
{
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	u64 *pml4 = (u64 *)(cr3 & ~0xfffull);
	u64 *pdpt = (u64 *)(pml4[0] & ~0xfffull);
	for (int i = 0; i < 512; i++)
		pds[slot][i] = ((gib << 30) + ((u64)i << 21)) | 0x83;
	pdpt[gib] = (u64)pds[slot] | 0x3;
	__asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
}

static u64 sweep(u64 from, u64 to, u64 stride)
{
	u64 n = 0;
	for (u64 a = from; a < to; a += stride) {
		mmio_read32(a);
		mmio_write32(a, 0xffffffff);
		mmio_read64(a + stride - 8);
		mmio_write64(a + stride - 8, ~0ull);
		n += 4;
	}
	return n;
}

static int case_mmio(void)
{
	u64 stride = 0x10000;
	arg_u64("stride=", &stride);
	if (stride < 16 || stride & 7) {
		printf("bad argument: stride must be a multiple of 8, at least 16\n");
		return EXIT_BAD_ARGS;
	}
	u64 ram = fwcfg_read(FW_CFG_RAM_SIZE, 8);
	if (ram > 0xc0000000ull) {
		printf("bad argument: needs RAM below 3 GiB\n");
		return EXIT_BAD_ARGS;
	}
	u64 n = 0;
	/* Between the end of RAM and the gap: no memory slot there. */
	n += sweep((ram + stride - 1) / stride * stride, 0xc0000000ull, stride);
	/* The whole gap, LAPIC and IOAPIC pages included. */
	n += sweep(0xc0000000ull, 0x100000000ull, stride);
	/* Above 4 GiB, where no RAM is: at 4 GiB, 64 GiB and 511 GiB. */
	u64 high[] = { 4, 64, 511 };
	for (int i = 0; i < 3; i++) {
		map_gib(i, high[i]);
		u64 base = high[i] << 30;
		n += sweep(base, base + (1ull << 30), stride < (1u << 24) ? 1u << 24 : stride);
	}
	serial_reset();
	printf("mmio: %lu accesses\n", n);
	return 0;
}

/* Fill [from, to), both 8-byte aligned, with the byte v. */
static void fill(u64 from, u64 to, u8 v)
{
	u64 q = v * 0x0101010101010101ull;
	for (u64 a = from; a < to; a += 8)
		*(volatile u64 *)a = q;
}

static int case_firmware(void)
{
	u64 v = 0xf4;
	arg_u64("fill=", &v);
	/* The real-mode IVT and BIOS data area, the EBDA, the legacy video
	 * hole, the ACPI tables and the BIOS area up to 1 MiB. */
	fill(0, 0x500, v);
	fill(0x9fc00, 0x100000, v);
	printf("firmware: overwritten with 0x%02lx\n", v & 0xff);
	if (!arg_str("s3"))
		return 0;
	/* The FACS now says 0xf4f4f4f4: real mode at 4f4f:0004. Make that a
	 * HLT sled, so the woken CPU halts with interrupts off. */
	fill(0x40000, 0x60000, 0xf4);
	printf("entering S3\n");
	outw(PM1A_CNT, SLP_TYP_S3 | SLP_EN);
	halt_for_good();
}

static void icr(u32 dest, u32 lo)
{
	while (lapic_read(APIC_ICR_LO) & ICR_BUSY)
		;
	lapic_write(APIC_ICR_HI, dest << 24);
	lapic_write(APIC_ICR_LO, lo);
}

static volatile u32 aps_up;

void ap_main(void)
{
	__atomic_fetch_add(&aps_up, 1, __ATOMIC_SEQ_CST);
}

static int case_sipi(void)
{
	u32 nb = fwcfg_read(FW_CFG_NB_CPUS, 2);
	u64 rounds = 10;
	arg_u64("rounds=", &rounds);
	lapic_enable();
	u64 sent = 0;
	for (u64 r = 0; r < rounds; r++) {
		/* Physical destination mode; 0xff is the xAPIC broadcast. */
		for (u32 id = nb; id < 0xff; id++) {
			icr(id, ICR_ASSERT | ICR_INIT);
			icr(id, ICR_INIT);
			icr(id, ICR_STARTUP | 0x08);
			icr(id, ICR_STARTUP | 0x9f);
			sent += 4;
		}
	}
	printf("sipi: %lu IPIs to absent xAPIC IDs\n", sent);
	/* The real APs still come up as usual. */
	if (nb > 1) {
		start_aps();
		while (aps_up < nb - 1)
			;
	}
	report(aps_up == nb - 1, "aps-online-after-storm");
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	if (c & (1u << 21)) {
		wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
		sent = 0;
		/* Beyond 8 bits, short of the 0xffffffff broadcast. */
		for (u64 r = 0; r < rounds; r++) {
			for (u32 id = 0x100; id < 0x100000; id = id * 3 + 1) {
				wrmsr(MSR_X2APIC_ICR, ((u64)id << 32) | ICR_ASSERT | ICR_INIT);
				wrmsr(MSR_X2APIC_ICR, ((u64)id << 32) | ICR_STARTUP | 0x08);
				sent += 2;
			}
			wrmsr(MSR_X2APIC_ICR, (0xfffffffeull << 32) | ICR_ASSERT | ICR_INIT);
			sent++;
		}
		printf("sipi: %lu IPIs to absent x2APIC IDs\n", sent);
	}
	return report_summary();
}

/* A stub for an AP, copied to STUB and entered by SIPI in real mode: with
 * the byte at stub_mode 0 it pushes with SP = 1 in real mode, which
 * faults, as does every exception delivery after it on that stack (since
 * the 80286 a shutdown); with 1 it enters 32-bit protected mode, loads an
 * empty IDT and executes UD2, whose #UD becomes a #GP, a double fault and
 * a shutdown. */
extern char stub_start[], stub_end[], stub_mode[];
__asm__(".pushsection .text\n"
	".code16\n"
	"stub_start:\n"
	"	cli\n"
	"	cmpb $1, %cs:(stub_mode - stub_start)\n"
	"	je 1f\n"
	"	movw $1, %sp\n"
	"	pushw %ax\n"
	"1:	lgdtl %cs:(stub_gdt_desc - stub_start)\n"
	"	movl %cr0, %eax\n"
	"	orl $1, %eax\n"
	"	movl %eax, %cr0\n"
	"	ljmpl $0x08, $(0x7000 + stub_pm32 - stub_start)\n"
	".code32\n"
	"stub_pm32:\n"
	"	movw $0x10, %ax\n"
	"	movw %ax, %ds\n"
	"	lidtl (0x7000 + stub_idt - stub_start)\n"
	"	ud2\n"
	"	.align 8\n"
	"stub_gdt:\n"
	"	.quad 0\n"
	"	.quad 0x00cf9a000000ffff\n"
	"	.quad 0x00cf92000000ffff\n"
	"stub_gdt_desc:\n"
	"	.word 23\n"
	"	.long 0x7000 + stub_gdt - stub_start\n"
	"stub_idt:\n"
	"	.word 0\n"
	"	.long 0\n"
	"stub_mode:\n"
	"	.byte 0\n"
	"stub_end:\n"
	".code64\n"
	".popsection\n");

static int triple_on_ap(u8 mode)
{
	u32 nb = fwcfg_read(FW_CFG_NB_CPUS, 2);
	if (nb < 2) {
		printf("bad argument: needs 2 vCPUs\n");
		return EXIT_BAD_ARGS;
	}
	memcpy((void *)STUB, stub_start, stub_end - stub_start);
	*(volatile u8 *)(STUB + (stub_mode - stub_start)) = mode;
	lapic_enable();
	printf("triple fault on an AP in %s mode\n", mode ? "protected" : "real");
	icr(1, ICR_ASSERT | ICR_INIT);
	icr(1, ICR_STARTUP | (STUB >> 12));
	for (;;)
		__asm__ volatile("pause");
}

static int triple_long(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) none = { 0, 0 };
	printf("triple fault in long mode\n");
	__asm__ volatile("lidt %0; ud2" : : "m"(none));
	return EXIT_FAIL;
}

static int case_halt(void)
{
	u32 nb = fwcfg_read(FW_CFG_NB_CPUS, 2);
	if (nb > 1) {
		lapic_enable();
		start_aps();
		while (aps_up < nb - 1)
			;
	}
	/* The APs halt with interrupts off once ap_main() returns. */
	printf("halting %u CPUs with interrupts off\n", nb);
	halt_for_good();
}

static void put(char c)
{
	outb(COM1, c);
}

static int case_flood(void)
{
	u64 lines = 0;
	bool bounded = arg_u64("lines=", &lines);
	static const char hex[] = "0123456789abcdef";
	for (u64 n = 0; !bounded || n < lines; n++) {
		/* "flood <16 hex digits> <the alphabet>\n": a reader checks
		 * that the numbers follow each other, so a lost byte shows. */
		put('f');
		put(' ');
		for (int s = 60; s >= 0; s -= 4)
			put(hex[(n >> s) & 0xf]);
		put(' ');
		for (char c = 'a'; c <= 'z'; c++)
			put(c);
		put('\n');
	}
	printf("flood: %lu lines\n", lines);
	return 0;
}

static u32 config_sweep_cf8(u16 bus)
{
	u32 writes = 0;
	for (u16 df = 0; df < 256; df++) {
		u16 bdf = (u16)(bus << 8) | df;
		for (u16 reg = 0; reg < 256; reg += 4) {
			pci_write32(bdf, reg, 0xffffffff);
			pci_write32(bdf, reg, 0);
			writes += 2;
		}
	}
	return writes;
}

static int case_pci(void)
{
	u64 ecam = pci_ecam_base();
	int rng = pci_find(0x1af4, 0x1044);
	printf("pci: ECAM at 0x%lx, virtio-rng at %d\n", ecam, rng);
	if (rng >= 0) {
		u16 bdf = (u16)rng;
		u64 bar = pci_bar64(bdf, 0);
		pci_write16(bdf, PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
		/* Garbage in the MSI-X table (0x4000) and PBA (0x5000), then MSI-X on. */
		for (u32 i = 0; i < 0x100; i += 4)
			mmio_write32(bar + 0x4000 + i, 0xdeadbeef ^ (i * 0x01010101u));
		mmio_write32(bar + 0x5000, 0xffffffff);
		u8 cap = pci_find_cap(bdf, PCI_CAP_MSIX, 0);
		if (cap)
			pci_write16(bdf, cap + 2, 0x8000);
		/* A configuration change: every vector fires at garbage. */
		mmio_write8(bar + 0x14, 0);
		static const u64 places[] = {0x100000, 0xe0000000, 0xfee00000, 0xfec00000,
					     0, 0xfffffffffff00000ull};
		for (u32 i = 0; i < sizeof(places) / sizeof(places[0]); i++) {
			pci_write32(bdf, PCI_BAR0, (u32)places[i]);
			pci_write32(bdf, PCI_BAR0 + 4, (u32)(places[i] >> 32));
			/* Read only: at 0x100000 the BAR would be over this guest. */
			if (places[i] && places[i] < (1ull << 32))
				mmio_read32(places[i] + 0x4000);
		}
		/* Back to the firmware's place, decoding on, for the sweep. */
		pci_write32(bdf, PCI_BAR0, (u32)bar);
		pci_write32(bdf, PCI_BAR0 + 4, (u32)(bar >> 32));
	}
	u32 writes = config_sweep_cf8(0) + config_sweep_cf8(1) + config_sweep_cf8(255);
	if (ecam) {
		for (u64 f = 0; f < 256; f++)
			for (u64 reg = 0; reg < 256; reg += 4) {
				mmio_write32(ecam + (f << 12) + reg, 0xffffffff);
				mmio_write32(ecam + (f << 12) + reg, 0);
				writes += 2;
			}
	}
	u32 id = pci_read32(0, 0);
	printf("pci: %u configuration writes; 00:00.0 reads 0x%x\n", writes, id);
	return 0;
}

static struct virtio_desc indirect[4] __attribute__((aligned(16)));
static u8 buf[64];

static int case_virtio(void)
{
	struct virtio_dev d;
	const char *t = arg_str("transport=");
	bool ok;
	if (t && !strncmp(t, "mmio", 4)) {
		u64 base = virtio_mmio_from_dsdt();
		ok = base && virtio_mmio_init(&d, base, 4);
	} else {
		int bdf = pci_find(0x1af4, 0x1044);
		ok = bdf >= 0 && virtio_pci_init(&d, (u16)bdf, 4, 0xffff);
	}
	if (!ok) {
		printf("virtio: no virtio-rng\n");
		return EXIT_FAIL;
	}
	u64 b = (u64)buf;
	const u16 W = VIRTQ_DESC_F_WRITE, N = VIRTQ_DESC_F_NEXT;
	struct virtio_desc self_loop[] = {{b, 8, W | N, 0}};
	struct virtio_desc outside[] = {{0xfff0000000ull, 16, W, 0}};
	struct virtio_desc past_end[] = {{0x8000000 - 8, 0x100000, W, 0}};
	struct virtio_desc readable[] = {{b, 16, 0, 0}};
	struct virtio_desc ind[] = {{(u64)indirect, sizeof(indirect), VIRTQ_DESC_F_INDIRECT, 0}};
	struct virtio_desc ring[VIRTIO_QSIZE];
	for (u16 i = 0; i < VIRTIO_QSIZE; i++)
		ring[i] = (struct virtio_desc){b, 1, W | N, (u16)((i + 1) % VIRTIO_QSIZE)};
	for (u16 i = 0; i < 4; i++)
		indirect[i] = (struct virtio_desc){b, 4, W | N, (u16)((i + 1) % 4)};
	struct {
		const char *what;
		struct virtio_desc *ds;
		u16 n;
	} chains[] = {
		{"loop", self_loop, 1},	       {"outside-ram", outside, 1},
		{"past-the-end", past_end, 1}, {"device-readable", readable, 1},
		{"indirect-loop", ind, 1},     {"longer-than-queue", ring, VIRTIO_QSIZE},
	};
	for (u32 i = 0; i < sizeof(chains) / sizeof(chains[0]); i++) {
		virtio_offer_raw(&d, chains[i].ds, chains[i].n, 0, 1);
		u32 len = virtio_wait_used(&d);
		printf("virtio: %s answered, %u bytes\n", chains[i].what, len);
	}
	int got = virtio_request(&d, buf, 16);
	report(got == 16, "good-request-after-bad-ones");
	/* These may stop the queue for good: nothing waits for them. */
	struct virtio_desc good[] = {{b, 16, W, 0}};
	virtio_offer_raw(&d, good, 1, 200, 1);
	virtio_offer_raw(&d, good, 1, 0, 1000);
	printf("virtio: head beyond the queue and index 1000 ahead offered\n");
	return report_summary();
}

int main(void)
{
	const char *c = arg_str("case=");
	if (!c) {
		printf("bad argument: case=NAME missing\n");
		return EXIT_BAD_ARGS;
	}
	if (!strncmp(c, "ports", 6))
		return case_ports();
	if (!strncmp(c, "mmio", 5))
		return case_mmio();
	if (!strncmp(c, "firmware", 9))
		return case_firmware();
	if (!strncmp(c, "sipi", 5))
		return case_sipi();
	if (!strncmp(c, "triple-long", 12))
		return triple_long();
	if (!strncmp(c, "triple-protected", 17))
		return triple_on_ap(1);
	if (!strncmp(c, "triple-real", 12))
		return triple_on_ap(0);
	if (!strncmp(c, "halt", 5))
		return case_halt();
	if (!strncmp(c, "flood", 6))
		return case_flood();
	if (!strncmp(c, "pci", 4))
		return case_pci();
	if (!strncmp(c, "virtio", 7))
		return case_virtio();
	if (!strncmp(c, "spin", 5))
		for (;;)
			__asm__ volatile("cli");
	printf("bad argument: unknown case %s\n", c);
	return EXIT_BAD_ARGS;
}
