/*
 * Start every AP with INIT + one SIPI (all-excluding-self, as kvm-unit-tests
 * does), let each record its APIC IDs, and check they are exactly 0..N-1.
 */
#include "guest.h"

struct cpu_ids {
	u32 lapic, cpuid1, cpuidb;
};

static struct cpu_ids ids[MAX_CPUS];
static volatile u32 ap_slots;  /* next free slot in ids[] */
static volatile u32 ap_online; /* APs whose slot is fully written */

static void read_ids(struct cpu_ids *r)
{
	u32 a, b, c, d;
	r->lapic = lapic_id();
	cpuid(1, 0, &a, &b, &c, &d);
	r->cpuid1 = b >> 24;
	cpuid(0, 0, &a, &b, &c, &d);
	r->cpuidb = r->lapic; /* no leaf 0xB: nothing to compare */
	if (a >= 0xb) {
		cpuid(0xb, 0, &a, &b, &c, &d);
		r->cpuidb = d;
	}
}

void ap_main(void)
{
	u32 slot = __atomic_fetch_add(&ap_slots, 1, __ATOMIC_SEQ_CST);
	if (slot >= MAX_CPUS - 1)
		return;
	read_ids(&ids[slot + 1]);
	/* Count only after the record is written, so the BSP never reads a half-filled slot. */
	__atomic_fetch_add(&ap_online, 1, __ATOMIC_SEQ_CST);
}

int main(void)
{
	u32 nb = fwcfg_read(FW_CFG_NB_CPUS, 2);
	u64 want;

	printf("fw_cfg NB_CPUS: %u\n", nb);
	if (arg_u64("cpus=", &want))
		report(nb == want, "cpus-arg");
	if (nb < 1 || nb > MAX_CPUS) {
		report(false, "nb-cpus-supported");
		return report_summary();
	}

	read_ids(&ids[0]);
	if (nb > 1) {
		lapic_enable();
		start_aps();
		while (ap_online < nb - 1)
			;
	}
	u32 online = 1 + ap_online;
	printf("CPUs online: %u\n", online);
	report(online == nb, "aps-online");

	/* With n CPUs and n distinct IDs all below n, the IDs are exactly 0..n-1. */
	bool seen[MAX_CPUS] = { false };
	bool ids_ok = true, cpuid1_ok = true, cpuidb_ok = true;
	for (u32 i = 0; i < online; i++) {
		struct cpu_ids *r = &ids[i];
		if (r->lapic >= nb || seen[r->lapic])
			ids_ok = false;
		else
			seen[r->lapic] = true;
		cpuid1_ok &= r->cpuid1 == r->lapic;
		cpuidb_ok &= r->cpuidb == r->lapic;
	}
	/* Print in APIC ID order: the APs arrive in any order. */
	for (u32 id = 0; id < nb; id++)
		for (u32 i = 0; i < online; i++)
			if (ids[i].lapic == id)
				printf("APIC ID %u: CPUID.1 %u, CPUID.0xB %u\n", id, ids[i].cpuid1, ids[i].cpuidb);
	report(ids[0].lapic == 0, "bsp-apic-id-0");
	report(ids_ok && online == nb, "apic-ids-0-to-n-1");
	report(cpuid1_ok, "cpuid1-apic-id");
	report(cpuidb_ok, "cpuidb-x2apic-id");
	return report_summary();
}
