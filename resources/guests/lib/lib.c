/* Runtime shared by the guests: serial output, printf, exit, fw_cfg, command line, reports, IDT, APIC. */
#include "guest.h"

/* ---- memory and strings (gcc may emit calls to these) ---- */

void *memset(void *d, int c, size_t n)
{
	/* Use a string instruction so that gcc cannot turn this loop back into a memset call. */
	void *r = d;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return r;
}

void *memcpy(void *d, const void *s, size_t n)
{
	void *r = d;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	return r;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] - y[i];
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (a[i] != b[i])
			return (u8)a[i] - (u8)b[i];
		if (!a[i])
			break;
	}
	return 0;
}

/* ---- COM1, polled ---- */

#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_THRE 0x20

void putchar_serial(char c)
{
	if (c == '\n')
		putchar_serial('\r');
	/* Bound the wait so a missing or stuck UART cannot hang the guest. */
	for (int i = 0; i < 1000000 && !(inb(COM1_LSR) & LSR_THRE); i++)
		;
	outb(COM1, c);
}

/* ---- printf: %d %i %u %x %X %p %s %c %%, flags '0' '-', width, .precision (%s), 'l'/'ll'/'z' ---- */

static int print_num(u64 v, bool neg, int base, bool upper, int width, char pad, bool left)
{
	char buf[24];
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	int n = 0, out = 0;
	do {
		buf[n++] = digits[v % base];
		v /= base;
	} while (v);
	int len = n + neg;
	if (neg && pad == '0') {
		putchar_serial('-');
		out++;
		neg = false;
	}
	for (; !left && width > len; width--, out++)
		putchar_serial(pad);
	if (neg) {
		putchar_serial('-');
		out++;
	}
	while (n) {
		putchar_serial(buf[--n]);
		out++;
	}
	for (; left && width > len; width--, out++)
		putchar_serial(' ');
	return out;
}

int vprintf(const char *fmt, va_list ap)
{
	int out = 0;
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			putchar_serial(*fmt);
			out++;
			continue;
		}
		fmt++;
		char pad = ' ';
		bool left = false;
		for (;; fmt++) {
			if (*fmt == '0')
				pad = '0';
			else if (*fmt == '-')
				left = true;
			else
				break;
		}
		int width = 0, prec = -1;
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		if (*fmt == '.') /* precision: only for %s (max characters) */
			for (prec = 0, fmt++; *fmt >= '0' && *fmt <= '9';)
				prec = prec * 10 + (*fmt++ - '0');
		int longs = 0;
		while (*fmt == 'l' || *fmt == 'z') {
			longs++;
			fmt++;
		}
		u64 u;
		switch (*fmt) {
		case 'd':
		case 'i': {
			long long v = longs ? va_arg(ap, long long) : va_arg(ap, int);
			u = v < 0 ? -(u64)v : (u64)v;
			out += print_num(u, v < 0, 10, false, width, pad, left);
			break;
		}
		case 'u':
		case 'x':
		case 'X':
			u = longs ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned int);
			out += print_num(u, false, *fmt == 'u' ? 10 : 16, *fmt == 'X', width, pad, left);
			break;
		case 'p':
			putchar_serial('0');
			putchar_serial('x');
			out += 2 + print_num((u64)va_arg(ap, void *), false, 16, false, width, pad, left);
			break;
		case 'c':
			putchar_serial((char)va_arg(ap, int));
			out++;
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			int len = 0;
			while (s[len] && len != prec)
				len++;
			for (; !left && width > len; width--, out++)
				putchar_serial(' ');
			for (int i = 0; i < len; i++, out++)
				putchar_serial(s[i]);
			for (; left && width > len; width--, out++)
				putchar_serial(' ');
			break;
		}
		case '%':
			putchar_serial('%');
			out++;
			break;
		case '\0':
			return out;
		default:
			putchar_serial('%');
			putchar_serial(*fmt);
			out += 2;
		}
	}
	return out;
}

int printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vprintf(fmt, ap);
	va_end(ap);
	return n;
}

/* ---- exit through isa-debug-exit ---- */

void exit(int code)
{
	outl(0xf4, (u32)code);
	/* Only reached without a debug-exit device: stop the CPU for good. */
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* ---- fw_cfg, legacy I/O interface ---- */

#define FW_CFG_CTL 0x510
#define FW_CFG_DATA 0x511

void fwcfg_read_bytes(u16 key, void *buf, int n)
{
	outw(FW_CFG_CTL, key);
	for (int i = 0; i < n; i++)
		((u8 *)buf)[i] = inb(FW_CFG_DATA);
}

u64 fwcfg_read(u16 key, int bytes)
{
	u8 b[8];
	u64 v = 0;
	fwcfg_read_bytes(key, b, bytes);
	for (int i = bytes - 1; i >= 0; i--)
		v = (v << 8) | b[i];
	return v;
}

/* ---- multiboot command line ---- */

#define CMDLINE_MAX 1024
#define ARGS_MAX 32

static char cmdline_buf[CMDLINE_MAX];
static char args_buf[CMDLINE_MAX];
static const char *args[ARGS_MAX];
static int nargs;

struct mb_info *mb_info(void)
{
	return (struct mb_info *)(u64)mb_info_addr;
}

const char *cmdline(void) { return cmdline_buf; }
int argc(void) { return nargs; }
const char *argv(int i) { return i < nargs ? args[i] : NULL; }

/* Where the loader put the command line, by boot protocol. */
static const char *loader_cmdline(void)
{
	if (boot_kind == BOOT_BZIMAGE) {
		const u8 *bp = (const u8 *)(u64)boot_info_addr;
		u32 lo, hi;
		memcpy(&lo, bp + 0x228, 4); /* hdr.cmd_line_ptr */
		memcpy(&hi, bp + 0xc8, 4);  /* ext_cmd_line_ptr */
		return (const char *)(((u64)hi << 32) | lo);
	}
	if (boot_kind == BOOT_PVH) {
		u64 p;
		memcpy(&p, (const u8 *)(u64)boot_info_addr + 24, 8); /* cmdline_paddr */
		return (const char *)p;
	}
	struct mb_info *mbi = mb_info();
	if (!mbi || !(mbi->flags & MB_INFO_CMDLINE) || !mbi->cmdline)
		return NULL;
	return (const char *)(u64)mbi->cmdline;
}

/* Copy the command line at boot: the loader's copy lives in low memory that a guest may reuse. */
static void parse_cmdline(void)
{
	const char *src = loader_cmdline();
	if (!src)
		return;
	size_t n = 0;
	while (src[n] && n < CMDLINE_MAX - 1)
		n++;
	memcpy(cmdline_buf, src, n);
	memcpy(args_buf, src, n);
	/*
	 * Split on blanks; argv[0] is the image path, as QEMU builds "<kernel> <append>".
	 * Linux protocols pass no image name, so argv[0] is a placeholder there.
	 */
	if (boot_kind != BOOT_MULTIBOOT)
		args[nargs++] = "kernel";
	for (char *p = args_buf; *p && nargs < ARGS_MAX;) {
		while (*p == ' ' || *p == '\t')
			*p++ = 0;
		if (!*p)
			break;
		args[nargs++] = p;
		while (*p && *p != ' ' && *p != '\t')
			p++;
	}
}

/* Value of the first argument (after argv[0]) that starts with prefix, e.g. "cpus=". */
const char *arg_str(const char *prefix)
{
	size_t n = strlen(prefix);
	for (int i = 1; i < nargs; i++)
		if (!strncmp(args[i], prefix, n))
			return args[i] + n;
	return NULL;
}

/*
 * Parse prefix's value as decimal or 0x-hex with an optional K/M/G suffix.
 * Return false when absent; exit(EXIT_BAD_ARGS) when malformed.
 */
bool arg_u64(const char *prefix, u64 *val)
{
	const char *s = arg_str(prefix);
	if (!s)
		return false;
	const char *p = s;
	int base = 10;
	u64 v = 0;
	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		base = 16;
		p += 2;
	}
	const char *digits = p;
	for (;; p++) {
		int d;
		if (*p >= '0' && *p <= '9')
			d = *p - '0';
		else if (base == 16 && *p >= 'a' && *p <= 'f')
			d = *p - 'a' + 10;
		else if (base == 16 && *p >= 'A' && *p <= 'F')
			d = *p - 'A' + 10;
		else
			break;
		v = v * base + d;
	}
	int shift = 0;
	if (*p == 'K' || *p == 'k')
		shift = 10;
	else if (*p == 'M' || *p == 'm')
		shift = 20;
	else if (*p == 'G' || *p == 'g')
		shift = 30;
	if (shift)
		p++;
	if (p == digits || *p) {
		printf("bad argument: %s%s\n", prefix, s);
		exit(EXIT_BAD_ARGS);
	}
	*val = v << shift;
	return true;
}

/* ---- reports ---- */

static int tests, failures;

void report(bool ok, const char *fmt, ...)
{
	va_list ap;
	tests++;
	if (!ok)
		failures++;
	printf("%s: ", ok ? "PASS" : "FAIL");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
}

int report_summary(void)
{
	printf("SUMMARY: %d tests, %d unexpected failures\n", tests, failures);
	return failures ? EXIT_FAIL : EXIT_PASS;
}

/* ---- interrupts ---- */

struct idt_entry {
	u16 off0, sel;
	u8 ist, type;
	u16 off1;
	u32 off2, zero;
} __attribute__((packed));

extern char isr_stubs[];
static struct idt_entry idt[256] __attribute__((aligned(16)));
static irq_handler_t handlers[256];

static const char *const exc_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#MP", "#TS", "#NP",
	"#SS", "#GP", "#PF", "#RSVD", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

void interrupt_dispatch(struct intr_frame *f)
{
	if (handlers[f->vector]) {
		handlers[f->vector](f);
		return;
	}
	/* Ignore the LAPIC's spurious vector (SPIV 0x1ff): it needs no handling and no EOI. */
	if (f->vector == 0xff)
		return;
	/* Anything unexpected is a guest or VMM bug: say where, and stop with a distinct code. */
	if (f->vector < 32) {
		u64 cr2 = 0;
		if (f->vector == 14)
			__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
		printf("EXCEPTION: vector %lu %s error 0x%lx rip 0x%lx cr2 0x%lx\n", f->vector,
		       exc_names[f->vector] ? exc_names[f->vector] : "", f->error, f->rip, cr2);
	} else {
		printf("UNEXPECTED INTERRUPT: vector 0x%lx rip 0x%lx\n", f->vector, f->rip);
	}
	exit(EXIT_UNEXPECTED);
}

void set_irq_handler(int vec, irq_handler_t fn)
{
	handlers[vec] = fn;
}

void idt_load(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) desc = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(desc));
}

static void idt_init(void)
{
	for (int v = 0; v < 256; v++) {
		u64 a = (u64)isr_stubs + 16 * v;
		idt[v] = (struct idt_entry){
			.off0 = a, .sel = 0x08, .type = 0x8e /* present, DPL 0, 64-bit interrupt gate */,
			.off1 = a >> 16, .off2 = a >> 32,
		};
	}
	idt_load();
}

/* ---- LAPIC (xAPIC MMIO) and IOAPIC ---- */

u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
u32 lapic_id(void) { return lapic_read(APIC_ID) >> 24; }
void lapic_eoi(void) { lapic_write(APIC_EOI, 0); }

void lapic_enable(void)
{
	lapic_write(APIC_TPR, 0);
	lapic_write(APIC_SPIV, 0x1ff); /* software-enable, spurious vector 0xff */
}

#define TRAMPOLINE 0x8000 /* SIPI vector 8 */

/* ICR: destination shorthand "all excluding self", level assert, delivery mode. */
#define ICR_ALL_BUT_SELF (3u << 18)
#define ICR_ASSERT (1u << 14)
#define ICR_BUSY (1u << 12)
#define ICR_INIT (5u << 8)
#define ICR_STARTUP (6u << 8)

static void icr_write(u32 lo)
{
	while (lapic_read(APIC_ICR_LO) & ICR_BUSY)
		;
	lapic_write(APIC_ICR_HI, 0);
	lapic_write(APIC_ICR_LO, lo);
}

/*
 * Wake every other CPU with INIT and one SIPI into the AP trampoline,
 * which enters ap_main() in 64-bit mode.
 */
void start_aps(void)
{
	memcpy((void *)TRAMPOLINE, ap_tramp_start, ap_tramp_end - ap_tramp_start);
	icr_write(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT);
	icr_write(ICR_ALL_BUT_SELF | ICR_STARTUP | (TRAMPOLINE >> 12));
}

u32 ioapic_read(u32 reg)
{
	mmio_write32(IOAPIC_BASE, reg);
	return mmio_read32(IOAPIC_BASE + 0x10);
}

void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(IOAPIC_BASE, reg);
	mmio_write32(IOAPIC_BASE + 0x10, v);
}

/* ---- entry from entry.S ---- */

void boot_main(void)
{
	idt_init();
	parse_cmdline();
	exit(main());
}

__attribute__((weak)) void ap_main(void)
{
}

void ap_boot_main(void)
{
	idt_load();
	ap_main();
	for (;;)
		__asm__ volatile("cli; hlt");
}
