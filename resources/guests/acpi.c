/*
 * Walk the ACPI tables the way an OS finds them (RSDP in the BIOS area),
 * check their checksums, and cross-check the FADT and MADT with fw_cfg.
 */
#include "guest.h"

struct rsdp {
	char sig[8];
	u8 checksum;
	char oem[6];
	u8 revision;
	u32 rsdt;
	u32 length; /* revision >= 2 from here on */
	u64 xsdt;
	u8 ext_checksum;
	u8 reserved[3];
} __attribute__((packed));

struct sdt {
	char sig[4];
	u32 length;
	u8 revision, checksum;
	char oem[6], oem_table[8];
	u32 oem_rev, creator, creator_rev;
} __attribute__((packed));

/* FADT offsets (ACPI 6.x, section 5.2.9) */
#define FADT_FIRMWARE_CTRL 36
#define FADT_DSDT 40
#define FADT_PM_TMR_BLK 76
#define FADT_X_FIRMWARE_CTRL 132
#define FADT_X_DSDT 140

static u8 sum(const void *p, u32 n)
{
	u8 s = 0;
	for (u32 i = 0; i < n; i++)
		s += ((const u8 *)p)[i];
	return s;
}

static u32 rd32(const void *p, u32 off) { u32 v; memcpy(&v, (const u8 *)p + off, 4); return v; }
static u64 rd64(const void *p, u32 off) { u64 v; memcpy(&v, (const u8 *)p + off, 8); return v; }

static struct rsdp *find_rsdp(void)
{
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (!memcmp((void *)a, "RSD PTR ", 8))
			return (struct rsdp *)a;
	return NULL;
}

/* Print a table and check its checksum; return it, or NULL if absent or unusable. */
static struct sdt *table(u64 addr, bool *all_ok)
{
	struct sdt *t = (struct sdt *)addr;
	if (!addr || addr >= (1ull << 32) || t->length < sizeof(*t)) {
		printf("table at 0x%lx: bad address or length\n", addr);
		*all_ok = false;
		return NULL;
	}
	bool ok = sum(t, t->length) == 0;
	printf("table %.4s at 0x%lx, length %u, revision %u%s\n", t->sig, addr, t->length, t->revision,
	       ok ? "" : ", BAD CHECKSUM");
	*all_ok &= ok;
	return t;
}

static void check_fadt(struct sdt *f, bool *all_ok)
{
	u64 dsdt = rd32(f, FADT_DSDT), facs = rd32(f, FADT_FIRMWARE_CTRL);
	if (f->length >= FADT_X_DSDT + 8 && rd64(f, FADT_X_DSDT))
		dsdt = rd64(f, FADT_X_DSDT);
	if (f->length >= FADT_X_FIRMWARE_CTRL + 8 && rd64(f, FADT_X_FIRMWARE_CTRL))
		facs = rd64(f, FADT_X_FIRMWARE_CTRL);

	struct sdt *d = table(dsdt, all_ok);
	report(d && !memcmp(d->sig, "DSDT", 4), "dsdt");

	/* The FACS has no checksum; check signature and minimum length. */
	struct sdt *fc = (struct sdt *)facs;
	bool facs_ok = facs && facs < (1ull << 32) && !memcmp(fc->sig, "FACS", 4) && fc->length >= 64;
	printf("FACS at 0x%lx\n", facs);
	report(facs_ok, "facs");

	u32 pmtmr = rd32(f, FADT_PM_TMR_BLK);
	printf("PM timer port: 0x%x\n", pmtmr);
	report(pmtmr != 0 && pmtmr <= 0xfffc, "pm-timer-port");
	if (pmtmr && pmtmr <= 0xfffc) {
		/* 3.58 MHz counter: it must move; a stuck one hangs the guest
		 * until the host's timeout ends the run. */
		u32 first = inl(pmtmr) & 0xffffff, now = first;
		while (now == first)
			now = inl(pmtmr) & 0xffffff;
		printf("PM timer: 0x%06x -> 0x%06x\n", first, now);
		report(now != first, "pm-timer-counts");
	}
}

static u32 count_madt_cpus(struct sdt *m)
{
	u32 n = 0;
	printf("MADT local APIC address: 0x%x\n", rd32(m, 36));
	report(rd32(m, 36) == LAPIC_BASE, "madt-lapic-address");
	for (u32 off = 44; off + 2 <= m->length;) {
		u8 *e = (u8 *)m + off;
		if (e[1] < 2)
			break; /* malformed: stop rather than loop forever */
		if (e[0] == 0 && e[1] >= 8) { /* Processor Local APIC */
			printf("MADT: local APIC uid %u id %u flags 0x%x\n", e[2], e[3], rd32(e, 4));
			n += rd32(e, 4) & 1;
		} else if (e[0] == 9 && e[1] >= 16) { /* Processor Local x2APIC */
			printf("MADT: local x2APIC id %u flags 0x%x\n", rd32(e, 4), rd32(e, 8));
			n += rd32(e, 8) & 1;
		}
		off += e[1];
	}
	return n;
}

int main(void)
{
	struct rsdp *r = find_rsdp();
	report(r, "rsdp-found");
	if (!r)
		return report_summary();
	printf("RSDP at 0x%lx, revision %u, OEM %.6s\n", (u64)r, r->revision, r->oem);
	report(sum(r, 20) == 0, "rsdp-checksum");
	if (r->revision >= 2)
		report(r->length >= sizeof(*r) && sum(r, r->length) == 0, "rsdp-ext-checksum");

	bool use_xsdt = r->revision >= 2 && r->xsdt;
	bool all_ok = true;
	struct sdt *root = table(use_xsdt ? r->xsdt : r->rsdt, &all_ok);
	report(root && !memcmp(root->sig, use_xsdt ? "XSDT" : "RSDT", 4), use_xsdt ? "xsdt" : "rsdt");
	if (!root)
		return report_summary();

	struct sdt *fadt = NULL, *madt = NULL;
	u32 esize = use_xsdt ? 8 : 4;
	for (u32 off = sizeof(*root); off + esize <= root->length; off += esize) {
		struct sdt *t = table(use_xsdt ? rd64(root, off) : rd32(root, off), &all_ok);
		if (t && !memcmp(t->sig, "FACP", 4))
			fadt = t;
		if (t && !memcmp(t->sig, "APIC", 4))
			madt = t;
	}

	report(fadt, "fadt");
	if (fadt)
		check_fadt(fadt, &all_ok);

	report(madt, "madt");
	if (madt) {
		u32 cpus = count_madt_cpus(madt), nb = fwcfg_read(FW_CFG_NB_CPUS, 2);
		u64 want;
		printf("MADT enabled CPUs: %u, fw_cfg NB_CPUS: %u\n", cpus, nb);
		report(cpus == nb, "madt-cpus-match-fwcfg");
		if (arg_u64("cpus=", &want))
			report(cpus == want, "cpus-arg");
	}
	report(all_ok, "table-checksums");
	return report_summary();
}
