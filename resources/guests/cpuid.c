/* Show what CPUID reports and check that the APIC IDs it gives match the LAPIC. */
#include "guest.h"

static void regs_to_str(char *s, u32 a, u32 b, u32 c)
{
	memcpy(s, &a, 4);
	memcpy(s + 4, &b, 4);
	memcpy(s + 8, &c, 4);
	s[12] = 0;
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
	const char *want = arg_str("expect-vendor=");
	if (want)
		report(!strncmp(vendor, want, 13), "expect-vendor");
	return report_summary();
}
