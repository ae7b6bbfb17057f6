/*
 * A minimal polling virtio driver (virtio 1.2): one split queue of 16
 * entries, device-writable buffers, no interrupts needed. Over
 * virtio-pci (modern: capabilities in BAR 0) or virtio-mmio version 2.
 * A device with several queues is brought up with virtio_*_start(), one
 * virtio_queue_init() per queue on rings of the caller's, and
 * virtio_driver_ok().
 */
#include "guest.h"

#define QSIZE 16
#define VERSION_1_HI 1 /* bit 32: feature word 1, bit 0 */

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

struct desc {
	u64 addr;
	u32 len;
	u16 flags, next;
};

static struct desc descs[QSIZE] __attribute__((aligned(16)));
static struct {
	u16 flags, idx, ring[QSIZE], used_event;
} avail __attribute__((aligned(2)));
static struct {
	u16 flags, idx;
	struct {
		u32 id, len;
	} ring[QSIZE];
	u16 avail_event;
} used __attribute__((aligned(4)));

/* virtio-pci common configuration (virtio 1.2, 4.1.4.3). */
#define C_DFSEL 0x00
#define C_DF 0x04
#define C_GFSEL 0x08
#define C_GF 0x0c
#define C_NUMQ 0x12
#define C_STATUS 0x14
#define C_QSEL 0x16
#define C_QSIZE 0x18
#define C_QMSIX 0x1a
#define C_QENABLE 0x1c
#define C_QNOTIFY 0x1e
#define C_QDESC 0x20
#define C_QDRIVER 0x28
#define C_QDEVICE 0x30

/* virtio-mmio registers (virtio 1.2, 4.2.2). */
#define M_MAGIC 0x000
#define M_VERSION 0x004
#define M_DEVICE 0x008
#define M_DF 0x010
#define M_DFSEL 0x014
#define M_GF 0x020
#define M_GFSEL 0x024
#define M_QSEL 0x030
#define M_QMAX 0x034
#define M_QNUM 0x038
#define M_QREADY 0x044
#define M_QNOTIFY 0x050
#define M_STATUS 0x070
#define M_QDESC 0x080
#define M_QDRIVER 0x090
#define M_QDEVICE 0x0a0

static u32 want_word0;

void virtio_want_features(u32 word0)
{
	want_word0 = word0;
}

static void rings_reset(struct virtio_dev *d)
{
	memset(descs, 0, sizeof(descs));
	memset(&avail, 0, sizeof(avail));
	memset(&used, 0, sizeof(used));
	d->last_used = 0;
}

bool virtio_pci_start(struct virtio_dev *d, u16 bdf, u32 type)
{
	u32 id = pci_read32(bdf, 0);
	if ((id & 0xffff) != 0x1af4 || id >> 16 != 0x1040 + type) {
		printf("virtio-pci: 0x%x is not a modern virtio device of type %u\n", id, type);
		return false;
	}
	memset(d, 0, sizeof(*d));
	d->pci = true;
	u64 bar = pci_bar64(bdf, 0);
	u32 notify_mult = 0, notify_off = 0;
	for (u8 c = pci_find_cap(bdf, PCI_CAP_VENDOR, 0); c; c = pci_find_cap(bdf, PCI_CAP_VENDOR, c)) {
		u8 cfg_type = pci_read8(bdf, c + 3);
		u32 off = pci_read32(bdf, c + 8);
		if (pci_read8(bdf, c + 4) != 0)
			continue; /* only BAR 0 is used */
		if (cfg_type == 1)
			d->common = bar + off;
		else if (cfg_type == 2) {
			notify_off = off;
			notify_mult = pci_read32(bdf, c + 16);
		} else if (cfg_type == 3)
			d->isr = bar + off;
		else if (cfg_type == 4)
			d->device = bar + off;
	}
	if (!d->common || !notify_off) {
		printf("virtio-pci: capabilities missing\n");
		return false;
	}
	pci_write16(bdf, PCI_COMMAND, pci_read16(bdf, PCI_COMMAND) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
	u64 c = d->common;
	mmio_write8(c + C_STATUS, 0);
	mmio_write8(c + C_STATUS, S_ACK | S_DRIVER);
	mmio_write32(c + C_DFSEL, 1);
	if (!(mmio_read32(c + C_DF) & VERSION_1_HI)) {
		printf("virtio-pci: no VIRTIO_F_VERSION_1\n");
		return false;
	}
	mmio_write32(c + C_DFSEL, 0);
	d->features = mmio_read32(c + C_DF) & want_word0;
	mmio_write32(c + C_GFSEL, 0);
	mmio_write32(c + C_GF, d->features);
	mmio_write32(c + C_GFSEL, 1);
	mmio_write32(c + C_GF, VERSION_1_HI);
	mmio_write8(c + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(mmio_read8(c + C_STATUS) & S_FEATURES_OK)) {
		printf("virtio-pci: FEATURES_OK refused\n");
		return false;
	}
	d->notify_base = bar + notify_off;
	d->notify_mult = notify_mult;
	return true;
}

/* Set queue `index` up on rings at `desc`, `drv`, `dev` (before
 * DRIVER_OK); its notification address. */
static u64 queue_setup(struct virtio_dev *d, u16 index, u16 msix_vector, void *desc, void *drv,
		       void *dev)
{
	u64 c = d->common;
	if (d->pci) {
		mmio_write16(c + C_QSEL, index);
		mmio_write16(c + C_QSIZE, QSIZE);
		mmio_write16(c + C_QMSIX, msix_vector);
		mmio_write32(c + C_QDESC, (u32)(u64)desc);
		mmio_write32(c + C_QDESC + 4, (u64)desc >> 32);
		mmio_write32(c + C_QDRIVER, (u32)(u64)drv);
		mmio_write32(c + C_QDRIVER + 4, (u64)drv >> 32);
		mmio_write32(c + C_QDEVICE, (u32)(u64)dev);
		mmio_write32(c + C_QDEVICE + 4, (u64)dev >> 32);
		mmio_write16(c + C_QENABLE, 1);
		return d->notify_base + (u64)mmio_read16(c + C_QNOTIFY) * d->notify_mult;
	}
	mmio_write32(c + M_QSEL, index);
	if (mmio_read32(c + M_QMAX) < QSIZE) {
		printf("virtio-mmio: queue %u too small\n", index);
		return 0;
	}
	mmio_write32(c + M_QNUM, QSIZE);
	mmio_write32(c + M_QDESC, (u32)(u64)desc);
	mmio_write32(c + M_QDESC + 4, (u64)desc >> 32);
	mmio_write32(c + M_QDRIVER, (u32)(u64)drv);
	mmio_write32(c + M_QDRIVER + 4, (u64)drv >> 32);
	mmio_write32(c + M_QDEVICE, (u32)(u64)dev);
	mmio_write32(c + M_QDEVICE + 4, (u64)dev >> 32);
	mmio_write32(c + M_QREADY, 1);
	return c + M_QNOTIFY;
}

void virtio_driver_ok(struct virtio_dev *d)
{
	u8 s = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
	if (d->pci)
		mmio_write8(d->common + C_STATUS, s);
	else
		mmio_write32(d->common + M_STATUS, s);
}

/* Queue 0 on the library's own rings, then DRIVER_OK. */
static bool queue0_and_go(struct virtio_dev *d, u16 msix_vector)
{
	rings_reset(d);
	d->notify = queue_setup(d, 0, msix_vector, descs, &avail, &used);
	if (!d->notify)
		return false;
	virtio_driver_ok(d);
	return true;
}

bool virtio_pci_init(struct virtio_dev *d, u16 bdf, u32 type, u16 msix_vector)
{
	return virtio_pci_start(d, bdf, type) && queue0_and_go(d, msix_vector);
}

bool virtio_queue_init(struct virtio_dev *d, struct virtq *q, u16 index)
{
	memset(q, 0, sizeof(*q));
	q->index = index;
	q->notify = queue_setup(d, index, 0xffff, q->desc, &q->avail, &q->used);
	return q->notify != 0;
}

void virtq_offer(struct virtio_dev *d, struct virtq *q, void *buf, u32 len, bool writable)
{
	u16 slot = q->avail.idx % QSIZE;
	q->desc[slot] = (struct virtio_desc){ (u64)buf, len, writable ? VIRTQ_DESC_F_WRITE : 0, 0 };
	q->avail.ring[slot] = slot;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	q->avail.idx++;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (d->pci)
		mmio_write16(q->notify, q->index);
	else
		mmio_write32(q->notify, q->index);
}

bool virtq_used(struct virtq *q, u16 *slot, u32 *len)
{
	if (*(volatile u16 *)&q->used.idx == q->last_used)
		return false;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	*slot = q->used.ring[q->last_used % QSIZE].id;
	*len = q->used.ring[q->last_used % QSIZE].len;
	q->last_used++;
	return true;
}

bool virtio_mmio_start(struct virtio_dev *d, u64 base, u32 type)
{
	if (mmio_read32(base + M_MAGIC) != 0x74726976 || mmio_read32(base + M_VERSION) != 2 ||
	    mmio_read32(base + M_DEVICE) != type) {
		printf("virtio-mmio at 0x%lx: not a version 2 device of type %u\n", base, type);
		return false;
	}
	memset(d, 0, sizeof(*d));
	d->common = base;
	d->device = base + 0x100;
	mmio_write32(base + M_STATUS, 0);
	mmio_write32(base + M_STATUS, S_ACK | S_DRIVER);
	mmio_write32(base + M_DFSEL, 1);
	if (!(mmio_read32(base + M_DF) & VERSION_1_HI)) {
		printf("virtio-mmio: no VIRTIO_F_VERSION_1\n");
		return false;
	}
	mmio_write32(base + M_DFSEL, 0);
	d->features = mmio_read32(base + M_DF) & want_word0;
	mmio_write32(base + M_GFSEL, 0);
	mmio_write32(base + M_GF, d->features);
	mmio_write32(base + M_GFSEL, 1);
	mmio_write32(base + M_GF, VERSION_1_HI);
	mmio_write32(base + M_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(mmio_read32(base + M_STATUS) & S_FEATURES_OK)) {
		printf("virtio-mmio: FEATURES_OK refused\n");
		return false;
	}
	return true;
}

bool virtio_mmio_init(struct virtio_dev *d, u64 base, u32 type)
{
	return virtio_mmio_start(d, base, type) && queue0_and_go(d, 0xffff);
}

u64 virtio_mmio_from_dsdt(void)
{
	u8 *dsdt = acpi_find("DSDT");
	if (!dsdt)
		return 0;
	u32 len;
	memcpy(&len, dsdt + 4, 4);
	for (u32 i = 0; i + 8 <= len; i++) {
		if (memcmp(dsdt + i, "LNRO0005", 8))
			continue;
		/* The _CRS after it: a Memory32Fixed descriptor (0x86, length 9). */
		for (u32 j = i + 8; j + 12 <= len && j < i + 64; j++)
			if (dsdt[j] == 0x86 && dsdt[j + 1] == 0x09 && dsdt[j + 2] == 0) {
				u32 base;
				memcpy(&base, dsdt + j + 4, 4);
				return base;
			}
	}
	return 0;
}

int virtio_request(struct virtio_dev *d, void *buf, u32 len)
{
	u16 head = avail.idx % QSIZE;
	descs[head].addr = (u64)buf;
	descs[head].len = len;
	descs[head].flags = 2; /* device-writable */
	descs[head].next = 0;
	avail.ring[avail.idx % QSIZE] = head;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	avail.idx++;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (d->pci)
		mmio_write16(d->notify, 0);
	else
		mmio_write32(d->notify, 0);
	/* A device that never answers hangs the guest until the host's timeout. */
	while (*(volatile u16 *)&used.idx == d->last_used)
		;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	u32 got = used.ring[d->last_used % QSIZE].len;
	d->last_used++;
	return (int)got;
}

void virtio_notify(struct virtio_dev *d)
{
	if (d->pci)
		mmio_write16(d->notify, 0);
	else
		mmio_write32(d->notify, 0);
}

void virtio_offer_quiet(const struct virtio_desc *ds, u16 n, u16 head, u16 step)
{
	for (u16 i = 0; i < n && i < QSIZE; i++) {
		descs[i].addr = ds[i].addr;
		descs[i].len = ds[i].len;
		descs[i].flags = ds[i].flags;
		descs[i].next = ds[i].next;
	}
	avail.ring[avail.idx % QSIZE] = head;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	avail.idx += step;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}

void virtio_offer_raw(struct virtio_dev *d, const struct virtio_desc *ds, u16 n, u16 head,
		      u16 step)
{
	virtio_offer_quiet(ds, n, head, step);
	virtio_notify(d);
}

u32 virtio_wait_used(struct virtio_dev *d)
{
	/* A device that never answers hangs the guest until the host's timeout. */
	while (*(volatile u16 *)&used.idx == d->last_used)
		;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	u32 got = used.ring[d->last_used % QSIZE].len;
	d->last_used++;
	return got;
}
