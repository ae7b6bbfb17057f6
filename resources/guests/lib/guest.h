/* Shared runtime of the kvmrun test guests: 64-bit, freestanding, no libc. */
#ifndef GUEST_H
#define GUEST_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define MAX_CPUS 64
#define LAPIC_BASE 0xfee00000ul
#define IOAPIC_BASE 0xfec00000ul

/* Exit codes (QEMU and kvmrun report (code << 1) | 1). */
#define EXIT_PASS 0
#define EXIT_FAIL 1
#define EXIT_BAD_ARGS 2
#define EXIT_UNEXPECTED 3 /* unexpected exception or interrupt */

/* fw_cfg keys */
#define FW_CFG_SIGNATURE 0x00
#define FW_CFG_RAM_SIZE 0x03
#define FW_CFG_NB_CPUS 0x05

/* Multiboot v1 information structure, as far as the guests read it. */
struct mb_info {
	u32 flags;
	u32 mem_lower, mem_upper;
	u32 boot_device;
	u32 cmdline;
	u32 mods_count, mods_addr;
	u32 syms[4];
	u32 mmap_length, mmap_addr;
} __attribute__((packed));

struct mb_mmap_entry {
	u32 size; /* of the rest of the entry, not counting this field */
	u64 addr, len;
	u32 type;
} __attribute__((packed));

#define MB_INFO_MEMORY (1u << 0)
#define MB_INFO_CMDLINE (1u << 2)
#define MB_INFO_MMAP (1u << 6)

/* Stack frame built by the interrupt stubs in entry.S. */
struct intr_frame {
	u64 r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

typedef void (*irq_handler_t)(struct intr_frame *f);

/* Each guest provides main(); its return value becomes the exit code. */
int main(void);
/* A guest that starts APs provides ap_main(); it runs in long mode on its own stack. */
void ap_main(void);

/* entry.S */
extern u32 mb_info_addr;
/* How the guest was entered, and the zero page or hvm_start_info address. */
#define BOOT_MULTIBOOT 1
#define BOOT_BZIMAGE 2
#define BOOT_PVH 3
extern u32 boot_kind, boot_info_addr;
extern char ap_tramp_start[], ap_tramp_end[];

/* Port I/O */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* MMIO: volatile accesses compile to a single mov of the given width. */
static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline u64 mmio_read64(u64 a) { return *(volatile u64 *)a; }
static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_write64(u64 a, u64 v) { *(volatile u64 *)a = v; }

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* Tens of milliseconds of TSC cycles on any host. Never a limit on a
 * wait for an event: a loaded host may starve a vCPU for any length of
 * time, so waits for events never give up, and the host's --timeout ends
 * a guest whose event never comes. */
#define SHORT_SPIN_CYCLES 100000000ull

/*
 * Stop the PIT's periodic ticks, as an OS that takes its ticks from the
 * LAPIC timer does: channel 0, lobyte/hibyte, mode 0, one last count.
 */
static inline void pit_stop(void)
{
	outb(0x43, 0x30);
	outb(0x40, 0);
	outb(0x40, 0);
}

/* Run PIT channel 0 as a rate generator (mode 2) dividing by `count`. */
static inline void pit_periodic(u16 count)
{
	outb(0x43, 0x34);
	outb(0x40, count & 0xff);
	outb(0x40, count >> 8);
}

/* lib.c */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

void putchar_serial(char c);
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
__attribute__((noreturn)) void exit(int code);

u64 fwcfg_read(u16 key, int bytes);
void fwcfg_read_bytes(u16 key, void *buf, int n);

struct mb_info *mb_info(void);
const char *cmdline(void);
int argc(void);
const char *argv(int i);
const char *arg_str(const char *prefix);
bool arg_u64(const char *prefix, u64 *val);

void report(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int report_summary(void);

void set_irq_handler(int vec, irq_handler_t fn);
void idt_load(void);

u32 lapic_read(u32 reg);
void lapic_write(u32 reg, u32 v);
u32 lapic_id(void);
void lapic_enable(void);
void lapic_eoi(void);
u32 ioapic_read(u32 reg);
void ioapic_write(u32 reg, u32 v);
void start_aps(void);

/* pci.c: configuration access through 0xCF8/0xCFC or ECAM, capabilities */
#define PCI_BDF(dev, fn) (((dev) << 3) | (fn))
u32 pci_read32(u16 bdf, u16 reg);
void pci_write32(u16 bdf, u16 reg, u32 v);
u16 pci_read16(u16 bdf, u16 reg);
void pci_write16(u16 bdf, u16 reg, u16 v);
u8 pci_read8(u16 bdf, u16 reg);
/* ECAM base from the ACPI MCFG (0 when there is none); reads through it. */
u64 pci_ecam_base(void);
u32 ecam_read32(u64 ecam, u16 bdf, u16 reg);
/* Offset of capability `id` (0 when absent); `from`: 0 for the first. */
u8 pci_find_cap(u16 bdf, u8 id, u8 from);
/* The first function with this vendor and device ID on bus 0, or -1. */
int pci_find(u16 vendor, u16 device);
/* A 64-bit memory BAR's address. */
u64 pci_bar64(u16 bdf, int bar);
/* An ACPI table by signature (through the RSDP and XSDT/RSDT), or NULL. */
void *acpi_find(const char *sig);

#define PCI_COMMAND 0x04
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_BAR0 0x10
#define PCI_CAP_MSIX 0x11
#define PCI_CAP_VENDOR 0x09

/* virtio.c: a polling virtio driver, one queue, over virtio-pci or virtio-mmio */
struct virtio_dev {
	bool pci;
	u64 common;	/* virtio-pci common configuration, or the virtio-mmio window */
	u64 notify;	/* queue 0's notification address */
	u64 isr;	/* virtio-pci ISR */
	u64 device;	/* the device-specific configuration */
	u32 features;	/* feature word 0 both sides took */
	u16 last_used;
	u64 notify_base; /* virtio-pci: the notification region */
	u32 notify_mult;
};
/* Feature bits of word 0 the next init takes when the device offers
 * them (none unless set; VERSION_1 is always taken). */
void virtio_want_features(u32 word0);
/* Bring up device type `type` with queue 0; `msix_vector` (pci, or 0xffff)
 * is queue 0's MSI-X vector. False (with a message) on failure. */
bool virtio_pci_init(struct virtio_dev *d, u16 bdf, u32 type, u16 msix_vector);
bool virtio_mmio_init(struct virtio_dev *d, u64 base, u32 type);
/* The first virtio-mmio window the DSDT announces (LNRO0005), or 0. */
u64 virtio_mmio_from_dsdt(void);
/* Offer `buf` (device-writable) on queue 0, notify, and poll for it;
 * the bytes the device wrote. */
int virtio_request(struct virtio_dev *d, void *buf, u32 len);
/* A split-queue descriptor, for guests that offer chains by hand. */
struct virtio_desc {
	u64 addr;
	u32 len;
	u16 flags, next;
};
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
/* Queue 0's size in virtio.c. */
#define VIRTIO_QSIZE 16
/* Put `n` raw descriptors at the start of queue 0's table, make `head`
 * available (`step` added to the available index: 1 for one chain),
 * and notify. Nothing is checked: this is for offering what a driver
 * must not. */
void virtio_offer_raw(struct virtio_dev *d, const struct virtio_desc *ds, u16 n, u16 head,
		      u16 step);
/* The same without the notification (a request left in the ring), and
 * the notification alone. */
void virtio_offer_quiet(const struct virtio_desc *ds, u16 n, u16 head, u16 step);
void virtio_notify(struct virtio_dev *d);
/* Wait for the device to return one more buffer; its used length. */
u32 virtio_wait_used(struct virtio_dev *d);
/* Several queues: bring the device up to FEATURES_OK, set each queue up
 * on rings of the caller's, then DRIVER_OK. */
struct virtq {
	struct virtio_desc desc[VIRTIO_QSIZE] __attribute__((aligned(16)));
	struct {
		u16 flags, idx, ring[VIRTIO_QSIZE], used_event;
	} avail __attribute__((aligned(2)));
	struct {
		u16 flags, idx;
		struct {
			u32 id, len;
		} ring[VIRTIO_QSIZE];
		u16 avail_event;
	} used __attribute__((aligned(4)));
	u16 index, last_used;
	u64 notify;
};
bool virtio_pci_start(struct virtio_dev *d, u16 bdf, u32 type);
bool virtio_mmio_start(struct virtio_dev *d, u64 base, u32 type);
bool virtio_queue_init(struct virtio_dev *d, struct virtq *q, u16 index);
void virtio_driver_ok(struct virtio_dev *d);
/* Offer one buffer in slot avail.idx % VIRTIO_QSIZE and notify. */
void virtq_offer(struct virtio_dev *d, struct virtq *q, void *buf, u32 len, bool writable);
/* One more used buffer, if there is one: its slot and length. */
bool virtq_used(struct virtq *q, u16 *slot, u32 *len);

/* LAPIC registers */
#define APIC_ID 0x20
#define APIC_TPR 0x80
#define APIC_EOI 0xb0
#define APIC_SPIV 0xf0
#define APIC_ICR_LO 0x300
#define APIC_ICR_HI 0x310

#endif
