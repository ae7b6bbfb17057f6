/*
 * The Intel IOMMU (VT-d) from inside, with the edu device behind it:
 * find the unit through the ACPI DMAR table, turn on queued
 * invalidation, program root, context and second-level tables for edu,
 * DMA through I/O virtual addresses, see a write to a read-only page
 * move nothing and fill a fault record, and take edu's MSI through an
 * interrupt remapping table entry. Needs `--machine q35 --edu
 * --iommu=intremap=on`.
 *
 * With `wait`, the guest does all that, waits for a key on COM1 (a test
 * snapshots the VM there) and goes on: it finds the unit's status, its
 * fault record and its queue as it left them, queues another wait
 * descriptor, DMAs through the same tables and takes another remapped
 * MSI, so a restored VM passes only with the unit's state restored.
 * Both ways it ends taking the unit's own interrupts: the fault event
 * held pending since the blocked write, and an invalidation wait's.
 */
#include "guest.h"

#define VTD_BASE 0xfed90000ul
#define VER 0x00
#define CAP 0x08
#define GCMD 0x18
#define GSTS 0x1c
#define RTADDR 0x20
#define FSTS 0x34
#define FECTL 0x38
#define FEDATA 0x3c
#define FEADDR 0x40
#define IQH 0x80
#define IQT 0x88
#define IQA 0x90
#define ICS 0x9c
#define IECTL 0xa0
#define IEDATA 0xa4
#define IEADDR 0xa8
#define IRTA 0xb8
#define FRCD 0x220

#define GCMD_TE (1u << 31)
#define GCMD_SRTP (1u << 30)
#define GCMD_QIE (1u << 26)
#define GCMD_IRE (1u << 25)
#define GCMD_SIRTP (1u << 24)
#define FSTS_PPF (1u << 1)
#define CTL_IP (1u << 30)

#define EDU_INTR_STATUS 0x24
#define EDU_INTR_RAISE 0x60
#define EDU_INTR_ACK 0x64
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_COUNT 0x90
#define EDU_DMA_CMD 0x98
#define DMA_START 1u
#define DMA_TO_RAM 2u
#define DMA_BUF 0x40000ul
#define PCI_CAP_MSI 0x05

#define MSI_VEC 0x53
#define FAULT_VEC 0x54
#define INV_VEC 0x55
#define IRTE_INDEX 5
/* The I/O virtual addresses: a read-write page and a read-only one. */
#define IOVA_RW 0x1000ul
#define IOVA_RO 0x2000ul

#define PAGE __attribute__((aligned(4096)))
static u64 root[512] PAGE;
static u64 context[512] PAGE;
static u64 sl_top[512] PAGE, sl_mid[512] PAGE, sl_leaf[512] PAGE;
static u64 queue[512] PAGE;
static u64 irt[512] PAGE;
static u8 page_rw[4096] PAGE;
static u8 page_ro[4096] PAGE;
static volatile u32 wait_status;

static u64 bar;
static volatile u32 msi_count, fault_events, invalidation_events;

static u32 rd(u32 reg) { return mmio_read32(VTD_BASE + reg); }
static u64 rdq(u32 reg) { return mmio_read64(VTD_BASE + reg); }
static void wr(u32 reg, u32 v) { mmio_write32(VTD_BASE + reg, v); }
static void wrq(u32 reg, u64 v) { mmio_write64(VTD_BASE + reg, v); }

/* Set one GCMD bit: the status written back with the bit added. */
static void gcmd(u32 bit)
{
	wr(GCMD, rd(GSTS) | bit);
	while (!(rd(GSTS) & bit))
		;
}

static void msi_handler(struct intr_frame *f)
{
	(void)f;
	msi_count++;
	mmio_write32(bar + EDU_INTR_ACK, mmio_read32(bar + EDU_INTR_STATUS));
	lapic_eoi();
}

static void dma(u64 from, u64 to, u64 count, u32 cmd)
{
	mmio_write64(bar + EDU_DMA_SRC, from);
	mmio_write64(bar + EDU_DMA_DST, to);
	mmio_write64(bar + EDU_DMA_COUNT, count);
	mmio_write32(bar + EDU_DMA_CMD, cmd | DMA_START);
	while (mmio_read32(bar + EDU_DMA_CMD) & DMA_START)
		;
}

static void fault_handler(struct intr_frame *f) { (void)f; fault_events++; lapic_eoi(); }
static void inv_handler(struct intr_frame *f) { (void)f; invalidation_events++; lapic_eoi(); }

/* Queue a global context-cache and IOTLB invalidation and a wait that
 * writes `status` (and with `irq`, interrupts); true once the unit has
 * run them all. */
static bool invalidate_irq(u32 status, bool irq)
{
	u64 tail = rdq(IQT) >> 4;
	u64 descs[3][2] = {
		{0x11, 0},
		{0x12, 0},
		{(u64)status << 32 | 0x25 | (irq ? 0x10 : 0), (u64)&wait_status},
	};
	for (int i = 0; i < 3; i++) {
		queue[tail * 2] = descs[i][0];
		queue[tail * 2 + 1] = descs[i][1];
		tail = (tail + 1) % 256;
	}
	wrq(IQT, tail << 4);
	return wait_status == status && rdq(IQH) == tail << 4;
}

static bool invalidate(u32 status) { return invalidate_irq(status, false); }

/* The unit's own interrupts: the pending fault event goes when its mask
 * is cleared, and a wait descriptor with its interrupt flag raises the
 * invalidation event. Neither is remapped. */
static void events(u32 status)
{
	u32 to_me = 0xfee00000u | lapic_id() << 12;
	wr(FEDATA, FAULT_VEC);
	wr(FEADDR, to_me);
	wr(FECTL, 0);
	while (!fault_events)
		;
	report(fault_events == 1 && !(rd(FECTL) & CTL_IP), "vtd-fault-event");
	wr(IEDATA, INV_VEC);
	wr(IEADDR, to_me);
	wr(IECTL, 0);
	bool ran = invalidate_irq(status, true);
	while (!invalidation_events)
		;
	report(ran && invalidation_events == 1 && (rd(ICS) & 1), "vtd-invalidation-event");
	wr(ICS, 1);
}

/* Root, context and a 3-level second-level table for `bdf`. */
static void map(int bdf)
{
	root[2 * (bdf >> 8)] = (u64)context | 1;
	context[2 * (bdf & 0xff)] = (u64)sl_top | 1;
	context[2 * (bdf & 0xff) + 1] = (u64)bdf << 8 | 1; /* domain, 39 bits */
	sl_top[0] = (u64)sl_mid | 3;
	sl_mid[0] = (u64)sl_leaf | 3;
	sl_leaf[IOVA_RW >> 12] = (u64)page_rw | 3;
	sl_leaf[IOVA_RO >> 12] = (u64)page_ro | 1;
}

/* Edu's MSI in remappable format, naming IRTE_INDEX. */
static u8 remapped_msi(int bdf)
{
	irt[2 * IRTE_INDEX] = (u64)lapic_id() << 40 | MSI_VEC << 16 | 1;
	irt[2 * IRTE_INDEX + 1] = 1u << 18 | bdf; /* verify the whole source-id */
	u8 cap = pci_find_cap(bdf, PCI_CAP_MSI, 0);
	if (!cap)
		return 0;
	pci_write32(bdf, cap + 4, 0xfee00000u | IRTE_INDEX << 5 | 1 << 4);
	pci_write32(bdf, cap + 8, 0);
	pci_write16(bdf, cap + 12, 0);
	pci_write16(bdf, cap + 2, pci_read16(bdf, cap + 2) | 1);
	return cap;
}

static bool dma_round_trip(u8 seed)
{
	for (int i = 0; i < 64; i++)
		page_rw[i] = (u8)(i * 5 + seed);
	dma(IOVA_RW, DMA_BUF, 64, 0);
	dma(DMA_BUF, IOVA_RW + 256, 64, DMA_TO_RAM);
	return !memcmp(page_rw, page_rw + 256, 64);
}

static void take_msi(u32 want)
{
	mmio_write32(bar + EDU_INTR_RAISE, 1);
	while (msi_count < want)
		;
}

int main(void)
{
	u8 *dmar = acpi_find("DMAR");
	report(dmar && dmar[37] == 1 && *(u64 *)(dmar + 56) == VTD_BASE && (dmar[52] & 1),
	       "dmar-unit-for-all-pci");
	int bdf = pci_find(0x1234, 0x11e8);
	report(bdf >= 0, "edu-found");
	if (bdf < 0)
		return report_summary();
	pci_write16(bdf, PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
	bar = pci_read32(bdf, PCI_BAR0) & ~0xful;
	report(rd(VER) == 0x10 && (rdq(CAP) & (2u << 8)), "vtd-version-39-bit");

	wrq(IQA, (u64)queue);
	gcmd(GCMD_QIE);
	map(bdf);
	wrq(RTADDR, (u64)root);
	wr(GCMD, rd(GSTS) | GCMD_SRTP);
	report(invalidate(1), "vtd-queued-invalidation");
	gcmd(GCMD_TE);
	report(dma_round_trip(1), "vtd-dma-through-tables");

	memset(page_ro, 0x77, 64);
	dma(DMA_BUF, IOVA_RO, 64, DMA_TO_RAM);
	u64 hi = rdq(FRCD + 8);
	report(page_ro[0] == 0x77 && (rd(FSTS) & FSTS_PPF) && rdq(FRCD) == IOVA_RO &&
		       (hi >> 63) && ((hi >> 32) & 0xff) == 5 && (u16)hi == bdf &&
		       (rd(FECTL) & CTL_IP),
	       "vtd-blocked-write-recorded");

	wrq(IRTA, (u64)irt | 7);
	wr(GCMD, rd(GSTS) | GCMD_SIRTP);
	gcmd(GCMD_IRE);
	set_irq_handler(MSI_VEC, msi_handler);
	set_irq_handler(FAULT_VEC, fault_handler);
	set_irq_handler(INV_VEC, inv_handler);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	lapic_enable();
	report(remapped_msi(bdf), "vtd-msi-remappable");
	sti();
	take_msi(1);
	report(msi_count == 1, "vtd-msi-remapped");
	if (!arg_str("wait")) {
		events(3);
		return report_summary();
	}

	printf("waiting for a key\n");
	while (!(inb(0x3fd) & 1))
		;
	printf("key: %c\n", inb(0x3f8));

	u32 all = GCMD_TE | GCMD_SRTP | GCMD_QIE | GCMD_IRE | GCMD_SIRTP;
	report(rd(GSTS) == all && rdq(RTADDR) == (u64)root && rdq(IRTA) == ((u64)irt | 7),
	       "vtd-status-kept");
	report((rd(FSTS) & FSTS_PPF) && rdq(FRCD) == IOVA_RO && (rd(FECTL) & CTL_IP),
	       "vtd-fault-record-kept");
	report(invalidate(2), "vtd-queue-goes-on");
	report(dma_round_trip(2), "vtd-dma-after");
	take_msi(2);
	report(msi_count == 2, "vtd-msi-remapped-after");
	events(3);
	/* Software clears the record: nothing is pending any more. */
	wr(FRCD + 12, 0x80000000u);
	report(!(rd(FSTS) & FSTS_PPF) && !(rd(FECTL) & CTL_IP), "vtd-fault-cleared");
	return report_summary();
}
