/*
 * Check fw_cfg (signature, CPU count, RAM size) against the arguments, and
 * check that the multiboot memory information agrees with RAM_SIZE.
 */
#include "guest.h"

#define MiB (1ull << 20)
#define GiB (1ull << 30)
/* Firmware and VMMs reserve the top of low RAM (ACPI tables etc.); allow this much. */
#define TOP_RESERVE (4 * MiB)

static struct mb_mmap_entry *mmap_next(struct mb_info *mbi, struct mb_mmap_entry *e)
{
	u64 end = (u64)mbi->mmap_addr + mbi->mmap_length;
	u64 p = e ? (u64)e + e->size + 4 : mbi->mmap_addr;
	return p + sizeof(*e) <= end ? (struct mb_mmap_entry *)p : NULL;
}

/* Is [start, end) covered by type-1 entries, possibly several adjacent ones? */
static bool ram_covers(struct mb_info *mbi, u64 start, u64 end)
{
	while (start < end) {
		struct mb_mmap_entry *e;
		for (e = mmap_next(mbi, NULL); e; e = mmap_next(mbi, e))
			if (e->type == 1 && e->addr <= start && start < e->addr + e->len)
				break;
		if (!e)
			return false;
		start = e->addr + e->len;
	}
	return true;
}

static bool ram_overlaps(struct mb_info *mbi, u64 start, u64 end)
{
	for (struct mb_mmap_entry *e = mmap_next(mbi, NULL); e; e = mmap_next(mbi, e))
		if (e->type == 1 && e->addr < end && start < e->addr + e->len)
			return true;
	return false;
}

int main(void)
{
	char sig[5] = { 0 };
	u64 want;

	fwcfg_read_bytes(FW_CFG_SIGNATURE, sig, 4);
	printf("fw_cfg signature: %s\n", sig);
	report(!memcmp(sig, "QEMU", 4), "signature");

	u32 nb = fwcfg_read(FW_CFG_NB_CPUS, 2);
	printf("fw_cfg NB_CPUS: %u\n", nb);
	report(nb >= 1, "nb-cpus-nonzero");
	if (arg_u64("cpus=", &want))
		report(nb == want, "cpus-arg");

	u64 ram = fwcfg_read(FW_CFG_RAM_SIZE, 8);
	printf("fw_cfg RAM_SIZE: 0x%lx (%lu MiB)\n", ram, ram >> 20);
	report(ram >= 2 * MiB, "ram-size-nonzero");
	if (arg_u64("mem=", &want))
		report(ram == want, "mem-arg");

	struct mb_info *mbi = mb_info();
	printf("multiboot info at 0x%x, flags 0x%x\n", mb_info_addr, mbi->flags);

	/* Expected end of RAM above 1 MiB; the split below 4 GiB varies above 2 GiB. */
	u64 top = 0;
	report(mbi->flags & MB_INFO_MEMORY, "mbi-memory-flag");
	if (mbi->flags & MB_INFO_MEMORY) {
		top = (u64)mbi->mem_upper * 1024 + MiB;
		printf("mem_lower: %u KiB, mem_upper: %u KiB (RAM top 0x%lx)\n", mbi->mem_lower,
		       mbi->mem_upper, top);
		u64 low = ram <= 3 * GiB ? ram : 2 * GiB;
		report(top <= ram && top <= 4 * GiB && top + TOP_RESERVE >= low, "mem-upper-matches-ram");
		report(mbi->mem_lower >= 512 && mbi->mem_lower <= 640, "mem-lower");
	}

	report(mbi->flags & MB_INFO_MMAP, "mmap-present");
	if (!(mbi->flags & MB_INFO_MMAP))
		return report_summary();
	u64 total = 0;
	for (struct mb_mmap_entry *e = mmap_next(mbi, NULL); e; e = mmap_next(mbi, e)) {
		printf("mmap: [0x%016lx, 0x%016lx) type %u\n", e->addr, e->addr + e->len, e->type);
		if (e->type == 1)
			total += e->len;
	}
	report(ram_covers(mbi, 0, 0x9f000), "mmap-low-ram");
	report(!ram_overlaps(mbi, 0xa0000, MiB), "mmap-legacy-hole");
	if (top)
		report(ram_covers(mbi, MiB, top), "mmap-covers-mem-upper");
	if (ram <= 3 * GiB)
		report(ram_covers(mbi, MiB, ram - TOP_RESERVE), "mmap-high-ram");
	/* All RAM but the holes (legacy area, top reserve) is listed, and nothing more. */
	printf("mmap RAM total: 0x%lx\n", total);
	report(total <= ram && total + TOP_RESERVE + MiB >= ram, "mmap-ram-total");
	return report_summary();
}
