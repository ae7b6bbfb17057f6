/*
 * Check what a Linux boot protocol handed over: built as a bzImage (64-bit
 * entry, RSI = boot_params) and as a PVH ELF (32-bit entry, EBX =
 * hvm_start_info). Arguments: kind=bzimage|pvh, mem=BYTES, cpus=N and
 * initrd=SIZE (the initrd starts with "KVMRUNRD", then byte i is i % 251).
 */
#include "guest.h"

extern char _end[];
/* Only defined when linked as a bzImage (bzimage.ld). */
extern char bz_init_size[] __attribute__((weak));

#define KERNEL_START 0x100000ul
#define E820_RAM 1
#define MAX_E820 128

struct region {
	u64 addr, size;
	u32 type;
};

static struct region map[MAX_E820];
static int nmap;

static u8 rd8(u64 a) { return *(volatile u8 *)a; }
static u16 rd16(u64 a) { u16 v; memcpy(&v, (void *)a, 2); return v; }
static u32 rd32(u64 a) { u32 v; memcpy(&v, (void *)a, 4); return v; }
static u64 rd64(u64 a) { u64 v; memcpy(&v, (void *)a, 8); return v; }

static u8 sum(u64 a, u32 n)
{
	u8 s = 0;
	for (u32 i = 0; i < n; i++)
		s += rd8(a + i);
	return s;
}

static bool in_ram(u64 addr, u64 size)
{
	for (int i = 0; i < nmap; i++)
		if (map[i].type == E820_RAM && addr >= map[i].addr &&
		    addr + size <= map[i].addr + map[i].size)
			return true;
	return false;
}

static void check_zero_page(u64 bp)
{
	report(bp && bp % 4096 == 0 && bp < 0xa0000, "zero-page-address");
	report(rd16(bp + 0x1fe) == 0xaa55, "bp-boot-flag");
	report(!memcmp((void *)(bp + 0x202), "HdrS", 4), "bp-header");
	report(rd16(bp + 0x206) == 0x020f, "bp-version");
	report(rd8(bp + 0x1f1) == 1, "bp-setup-sects");
	report(rd8(bp + 0x210) == 0xff, "bp-loader-type");
	report(rd8(bp + 0x211) & 1, "bp-loadflags-loaded-high");
	report(rd32(bp + 0x214) == KERNEL_START, "bp-code32-start");
	report(rd32(bp + 0x260) == (u32)(u64)bz_init_size, "bp-init-size");
	report(rd16(bp + 0x236) & 1, "bp-xloadflags-kernel-64");
	u32 n = rd8(bp + 0x1e8);
	for (u32 i = 0; i < n && i < MAX_E820; i++, nmap++) {
		u64 e = bp + 0x2d0 + 20 * i;
		map[i] = (struct region){ rd64(e), rd64(e + 8), rd32(e + 16) };
	}
}

static void check_start_info(u64 si)
{
	report(si && si < 0xa0000, "start-info-address");
	report(rd32(si) == 0x336ec578, "si-magic");
	report(rd32(si + 4) >= 1, "si-version");
	u64 mm = rd64(si + 40);
	u32 n = rd32(si + 48);
	report(mm && n, "si-memmap");
	for (u32 i = 0; i < n && i < MAX_E820; i++, nmap++) {
		u64 e = mm + 24 * i;
		map[i] = (struct region){ rd64(e), rd64(e + 8), rd32(e + 16) };
	}
}

static void check_e820(u64 mem)
{
	u64 ram = 0, ram_end = 0;
	bool sorted = true, hole_clear = true;
	for (int i = 0; i < nmap; i++) {
		printf("e820: [0x%lx, 0x%lx) type %u\n", map[i].addr, map[i].addr + map[i].size,
		       map[i].type);
		if (i && map[i].addr < map[i - 1].addr + map[i - 1].size)
			sorted = false;
		if (map[i].type != E820_RAM)
			continue;
		ram += map[i].size;
		if (map[i].addr + map[i].size > ram_end)
			ram_end = map[i].addr + map[i].size;
		if (map[i].addr < 0x100000 && map[i].addr + map[i].size > 0xa0000)
			hole_clear = false;
	}
	report(nmap > 0, "e820-present");
	report(sorted, "e820-sorted-disjoint");
	report(hole_clear, "e820-legacy-hole");
	report(in_ram(0, 0x9f000), "e820-low-ram");
	report(in_ram(KERNEL_START, (u64)_end - KERNEL_START), "e820-kernel-in-ram");
	if (mem && mem <= 0xc0000000ul) {
		report(ram_end == mem, "e820-ram-end-matches-mem");
		/* Only the EBDA, the VGA hole and the BIOS area are not RAM. */
		report(ram == mem - (0x100000 - 0x9fc00), "e820-ram-total-matches-mem");
	}
	printf("e820 RAM: %lu bytes, ends at 0x%lx\n", ram, ram_end);
}

static void check_initrd(u64 at, u64 size, u64 want)
{
	printf("initrd: 0x%lx, %lu bytes\n", at, size);
	if (!want) {
		report(at == 0 && size == 0, "no-initrd");
		return;
	}
	report(size == want, "initrd-size");
	report(at % 4096 == 0, "initrd-page-aligned");
	report(in_ram(at, size), "initrd-in-ram");
	report(at >= (u64)_end, "initrd-above-kernel");
	report(at + size - 1 <= 0x37ffffff, "initrd-below-addr-max");
	bool ok = size >= 8 && !memcmp((void *)at, "KVMRUNRD", 8);
	for (u64 i = 8; ok && i < size; i++)
		ok = rd8(at + i) == i % 251;
	report(ok, "initrd-content");
}

static u64 find_rsdp(void)
{
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (!memcmp((void *)a, "RSD PTR ", 8))
			return a;
	return 0;
}

static u64 find_table(u64 rsdp, const char *sig)
{
	u64 xsdt = rd64(rsdp + 24);
	u32 len = rd32(xsdt + 4);
	for (u32 off = 36; off + 8 <= len; off += 8) {
		u64 t = rd64(xsdt + off);
		if (!memcmp((void *)t, sig, 4))
			return t;
	}
	return 0;
}

static void check_acpi(u64 given, u64 cpus)
{
	u64 scanned = find_rsdp();
	printf("RSDP: given 0x%lx, BIOS area scan 0x%lx\n", given, scanned);
	report(given != 0, "rsdp-given");
	report(given == scanned, "rsdp-matches-bios-scan");
	if (!given || memcmp((void *)given, "RSD PTR ", 8)) {
		report(false, "rsdp-signature");
		return;
	}
	report(sum(given, 20) == 0 && rd8(given + 15) >= 2 && sum(given, 36) == 0, "rsdp-checksums");
	report(!memcmp((void *)(given + 9), "KVMRUN", 6), "rsdp-oem-kvmrun");
	u64 madt = find_table(given, "APIC");
	report(madt != 0, "madt");
	if (!madt)
		return;
	u32 len = rd32(madt + 4), n = 0;
	for (u32 off = 44; off + 2 <= len && rd8(madt + off + 1); off += rd8(madt + off + 1)) {
		u8 type = rd8(madt + off);
		if ((type == 0 && (rd32(madt + off + 4) & 1)) || (type == 9 && (rd32(madt + off + 8) & 1)))
			n++;
	}
	printf("MADT enabled CPUs: %u\n", n);
	if (cpus)
		report(n == cpus, "madt-cpus-match-arg");
	u64 fadt = find_table(given, "FACP");
	u64 dsdt = fadt ? rd32(fadt + 40) : 0;
	bool com1 = false;
	for (u32 i = 36; dsdt && i + 4 <= rd32(dsdt + 4); i++)
		com1 |= !memcmp((void *)(dsdt + i), "COM1", 4);
	report(com1, "dsdt-com1");
}

static void check_timing_leaf(void)
{
	u32 a, b, c, d;
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	bool have = a >= 0x40000010;
	u32 khz = 0, bus = 0;
	if (have)
		cpuid(0x40000010, 0, &khz, &bus, &c, &d);
	printf("CPUID 0x40000010: TSC %u kHz, bus %u kHz\n", khz, bus);
	report(have && khz != 0 && bus == 1000000, "cpuid-timing-leaf");
}

int main(void)
{
	const char *kind = arg_str("kind=");
	u64 mem = 0, cpus = 0, initrd = 0;
	arg_u64("mem=", &mem);
	arg_u64("cpus=", &cpus);
	arg_u64("initrd=", &initrd);
	printf("kvmrun linuxboot guest: entered by %s\n",
	       boot_kind == BOOT_BZIMAGE ? "bzImage 64-bit entry" :
	       boot_kind == BOOT_PVH ? "PVH 32-bit entry" : "multiboot");
	printf("cmdline: %s\n", cmdline());
	if (kind)
		report((!strncmp(kind, "bzimage", 8) && boot_kind == BOOT_BZIMAGE) ||
		       (!strncmp(kind, "pvh", 4) && boot_kind == BOOT_PVH), "boot-kind");

	u64 info = boot_info_addr, rsdp = 0, rd_at = 0, rd_size = 0;
	u64 cmd = 0;
	if (boot_kind == BOOT_BZIMAGE) {
		check_zero_page(info);
		cmd = rd32(info + 0x228) | (u64)rd32(info + 0xc8) << 32;
		rd_at = rd32(info + 0x218) | (u64)rd32(info + 0xc0) << 32;
		rd_size = rd32(info + 0x21c) | (u64)rd32(info + 0xc4) << 32;
		rsdp = rd64(info + 0x70);
	} else if (boot_kind == BOOT_PVH) {
		check_start_info(info);
		cmd = rd64(info + 24);
		if (rd32(info + 12)) {
			u64 mod = rd64(info + 16);
			rd_at = rd64(mod);
			rd_size = rd64(mod + 8);
		}
		rsdp = rd64(info + 32);
	} else {
		report(false, "linux-boot-protocol");
		return report_summary();
	}
	u64 n = 0;
	while (cmd && n < 2048 && rd8(cmd + n))
		n++;
	report(cmd && cmd < 0xa0000 && n < 2048, "cmdline-pointer");
	check_e820(mem);
	check_initrd(rd_at, rd_size, initrd);
	check_acpi(rsdp, cpus);
	check_timing_leaf();
	return report_summary();
}
