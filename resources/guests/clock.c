/*
 * kvmclock and the TSC across a snapshot: read both, wait for a byte on
 * COM1 (the host snapshots the VM and restores it meanwhile), read both
 * again and report how far kvmclock's interval and the TSC's, turned into
 * nanoseconds by kvmclock's own scale, differ. KVM keeps the two together
 * within one VM; a snapshot that saves or restores the TSC and kvmclock
 * at different instants moves one against the other, and a Linux guest
 * then marks its TSC unstable.
 *
 * Arguments: max-skew-us=N (default 100000; the host test makes a save
 * 500 ms slow between the vCPUs' state and the clock).
 */
#include "guest.h"

#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01
#define KVM_CPUID_FEATURES 0x40000001
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)
#define COM1 0x3f8
#define LSR_DR 0x01

/* pvclock_vcpu_time_info, as KVM writes it. */
struct pvclock {
	u32 version;
	u32 pad0;
	u64 tsc_timestamp;
	u64 system_time;
	u32 mul;
	signed char shift;
	u8 flags;
	u8 pad[2];
} __attribute__((packed));

static volatile struct pvclock pv __attribute__((aligned(64)));

static inline void wrmsr(u32 index, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(index), "a"((u32)v), "d"((u32)(v >> 32)));
}

/* TSC cycles to nanoseconds by the pvclock's scale. */
static u64 scale(u64 cycles, u32 mul, signed char shift)
{
	if (shift < 0)
		cycles >>= -shift;
	else
		cycles <<= shift;
	return (u64)(((unsigned __int128)cycles * mul) >> 32);
}

struct reading {
	u64 ns, tsc;
	u32 mul;
	signed char shift;
};

/* kvmclock and the TSC of one instant (the pvclock read protocol). */
static struct reading now(void)
{
	struct reading r;
	u32 v;
	do {
		v = pv.version;
		barrier();
		r.tsc = rdtsc();
		r.mul = pv.mul;
		r.shift = pv.shift;
		r.ns = pv.system_time + scale(r.tsc - pv.tsc_timestamp, r.mul, r.shift);
		barrier();
	} while ((v & 1) || v != pv.version);
	return r;
}

static char wait_key(void)
{
	while (!(inb(COM1 + 5) & LSR_DR))
		;
	return inb(COM1);
}

int main(void)
{
	u64 max_us = 100000;
	arg_u64("max-skew-us=", &max_us);
	u32 a, b, c, d;
	cpuid(KVM_CPUID_FEATURES, 0, &a, &b, &c, &d);
	if (!(a & KVM_FEATURE_CLOCKSOURCE2)) {
		report(false, "kvmclock-offered");
		return report_summary();
	}
	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)(uintptr_t)&pv | 1);
	while (!pv.version)
		;
	struct reading r0 = now();
	printf("clock: waiting for a key\n");
	printf("key: %c\n", wait_key());
	struct reading r1 = now();
	u64 dk = r1.ns - r0.ns;
	u64 dt = scale(r1.tsc - r0.tsc, r1.mul, r1.shift);
	long long skew_us = ((long long)dk - (long long)dt) / 1000;
	printf("clock: kvmclock moved %lu us, the TSC %lu us, skew %lld us\n",
	       dk / 1000, dt / 1000, skew_us);
	report(skew_us <= (long long)max_us && -skew_us <= (long long)max_us,
	       "kvmclock-follows-the-tsc");
	return report_summary();
}
