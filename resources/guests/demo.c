/* The guest `make run` boots: a banner and a few facts the guest finds out for itself. */
#include "guest.h"

int main(void)
{
	u32 a, b, c, d;
	char vendor[13];

	printf("\n");
	printf("  +----------------------------------+\n");
	printf("  |        kvmrun demo guest         |\n");
	printf("  |  64-bit C on bare (virtual) x86  |\n");
	printf("  +----------------------------------+\n");
	printf("\n");

	cpuid(0, 0, &a, &b, &c, &d);
	memcpy(vendor, &b, 4);
	memcpy(vendor + 4, &d, 4);
	memcpy(vendor + 8, &c, 4);
	vendor[12] = 0;
	u64 ram = fwcfg_read(FW_CFG_RAM_SIZE, 8);

	printf("CPU vendor:   %s\n", vendor);
	printf("CPUs:         %u\n", (u32)fwcfg_read(FW_CFG_NB_CPUS, 2));
	printf("RAM:          %lu MiB\n", ram >> 20);
	printf("Boot CPU:     LAPIC ID %u\n", lapic_id());
	printf("Command line: %s\n", cmdline());
	printf("\nBye from the kvmrun demo guest.\n");
	return EXIT_PASS;
}
