/* Show what CPUID reports and check that the APIC IDs it gives match the LAPIC. */
#include "guest.h"

static void regs_to_str(char *s, u32 a, u32 b, u32 c)
{
	memcpy(s, &a, 4);
	memcpy(s + 4, &b, 4);
	memcpy(s + 8, &c, 4);
	s[12] = 0;
}

/* Parse `n` hex digits or up to the next ':' / end; false on a bad digit. */
static const char *hex(const char *p, u32 *out)
{
	u32 v = 0;
	const char *start = p;
	for (; *p && *p != ':'; p++) {
		u32 d;
		if (*p >= '0' && *p <= '9')
			d = *p - '0';
		else if (*p >= 'a' && *p <= 'f')
			d = *p - 'a' + 10;
		else if (*p >= 'A' && *p <= 'F')
			d = *p - 'A' + 10;
		else
			return NULL;
		v = v << 4 | d;
	}
	if (p == start)
		return NULL;
	*out = v;
	return *p == ':' ? p + 1 : p;
}

/*
 * Each `w=LEAF:SUB:REG:MASK:VALUE` (hex; REG 0-3 for EAX-EDX) checks that
 * the bits in MASK of that CPUID register equal VALUE's.
 */
static void check_words(void)
{
	for (int i = 1; i < argc(); i++) {
		const char *p = argv(i);
		u32 f[5];
		if (strncmp(p, "w=", 2))
			continue;
		p += 2;
		for (int k = 0; k < 5; k++) {
			if (!p || !(p = hex(p, &f[k]))) {
				printf("bad argument: %s\n", argv(i));
				exit(EXIT_BAD_ARGS);
			}
		}
		u32 r[4];
		cpuid(f[0], f[1], &r[0], &r[1], &r[2], &r[3]);
		u32 got = r[f[2] & 3];
		bool ok = (got & f[3]) == (f[4] & f[3]);
		if (!ok)
			printf("CPUID 0x%x.%u reg %u: got 0x%08x, want 0x%08x in mask 0x%08x\n",
			       f[0], f[1], f[2], got, f[4], f[3]);
		report(ok, "word-%x.%x.%x", f[0], f[1], f[2]);
	}
}

int main(void)
{
	u32 a, b, c, d;
	char vendor[13], hv[13];

	cpuid(0, 0, &a, &b, &c, &d);
	u32 max = a;
	regs_to_str(vendor, b, d, c);
	printf("vendor: %s\n", vendor);
	printf("max basic leaf: 0x%x\n", max);

	cpuid(1, 0, &a, &b, &c, &d);
	u32 ecx1 = c;
	u32 apic_id_1 = b >> 24;
	printf("leaf 0x1: eax=0x%08x ebx=0x%08x ecx=0x%08x edx=0x%08x\n", a, b, c, d);
	if (max >= 7) {
		cpuid(7, 0, &a, &b, &c, &d);
		printf("leaf 0x7.0: eax=0x%08x ebx=0x%08x ecx=0x%08x edx=0x%08x\n", a, b, c, d);
	}

	cpuid(0x40000000, 0, &a, &b, &c, &d);
	regs_to_str(hv, b, c, d);
	/* Print the printable part only: KVM's signature is padded with NULs. */
	printf("hypervisor: %s max leaf 0x%x\n", hv, a);

	cpuid(0x80000000, 0, &a, &b, &c, &d);
	u32 max_ext = a;
	printf("max extended leaf: 0x%x\n", max_ext);
	bool lm = false;
	if (max_ext >= 0x80000001) {
		cpuid(0x80000001, 0, &a, &b, &c, &d);
		lm = d & (1u << 29);
	}
	if (max_ext >= 0x80000004) {
		char brand[49];
		for (u32 i = 0; i < 3; i++) {
			cpuid(0x80000002 + i, 0, &a, &b, &c, &d);
			memcpy(brand + 16 * i, &a, 4);
			memcpy(brand + 16 * i + 4, &b, 4);
			memcpy(brand + 16 * i + 8, &c, 4);
			memcpy(brand + 16 * i + 12, &d, 4);
		}
		brand[48] = 0;
		const char *p = brand;
		while (*p == ' ')
			p++;
		printf("brand: %s\n", *p ? p : "(none)");
	}

	u32 lapic = lapic_id();
	printf("LAPIC ID: %u, CPUID.1 APIC ID: %u\n", lapic, apic_id_1);

	report(ecx1 & (1u << 31), "hypervisor-bit");
	report(!memcmp(hv, "KVMKVMKVM\0\0\0", 12), "hypervisor-signature");
	report(lm, "long-mode-bit");
	report(apic_id_1 == lapic, "cpuid1-apic-id");
	if (max >= 0xb) {
		cpuid(0xb, 0, &a, &b, &c, &d);
		printf("leaf 0xb.0: x2APIC ID %u\n", d);
		report(d == lapic, "cpuidb-x2apic-id");
	}
	check_words();
	const char *want = arg_str("expect-vendor=");
	if (want)
		report(!strncmp(vendor, want, 13), "expect-vendor");
	return report_summary();
}
