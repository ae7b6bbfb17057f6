/*
 * Compute over memory on every CPU with LAPIC timer interrupts in flight,
 * print a checksum, exit. The output does not depend on timing, so a run
 * that is snapshotted and restored anywhere must print exactly what an
 * uninterrupted run prints.
 *
 * Arguments: words=N (64-bit words per CPU, a power of two, default 32K),
 * rounds=N (mixing passes, default 8), ticks=N (timer interrupts each CPU
 * must see before it finishes, default 50), wait (after phase 1, wait for
 * a byte on COM1 before phase 2), migrate=N (after phase 1, N times: ask
 * to be migrated with the line kvm-unit-tests' migration harness answers,
 * then wait for a byte), migrate-skip (before that, say no migration will
 * come and wait for a byte), continuous (ask to be migrated continuously
 * during phase 2, as kvm-unit-tests' migrate_begin_continuous() and
 * migrate_end_continuous() do), pit-off (stop the PIT's periodic ticks, which
 * the firmware leaves running), pit-count=N (run the PIT periodically
 * dividing by N instead; IRQ 0 stays masked either way).
 */
#include "guest.h"

#define APIC_LVT_TIMER 0x320
#define APIC_TIMER_INIT 0x380
#define APIC_TIMER_DIV 0x3e0
#define TIMER_VECTOR 0x30
#define TIMER_PERIODIC (1u << 17)

#define COM1 0x3f8
#define LSR_DR 0x01

/* Work areas: CPU c uses [WORK_BASE + c * words * 8, ...). */
#define WORK_BASE 0x1000000ul
/* Waits never give up: a loaded host may starve a vCPU for any length of
 * time, so a lost timer or AP shows as a hang that the host's --timeout
 * ends, never as a verdict decided by the clock. */

static u64 words = 32768, rounds = 8, min_ticks = 50;
static u32 ncpus;
static volatile u64 ticks[MAX_CPUS];
static volatile u64 sums[MAX_CPUS];
static volatile u32 phase1_done, phase2_go, phase2_done, ap_started;
static volatile bool ticks_ok[MAX_CPUS];

static void tick(struct intr_frame *f)
{
	(void)f;
	ticks[lapic_id()]++;
	lapic_eoi();
}

static void start_timer(void)
{
	lapic_enable();
	lapic_write(APIC_TIMER_DIV, 0xb); /* divide by 1 */
	lapic_write(APIC_LVT_TIMER, TIMER_VECTOR | TIMER_PERIODIC);
	lapic_write(APIC_TIMER_INIT, 1000000);
	sti();
}

static u64 *area(u32 cpu)
{
	return (u64 *)(WORK_BASE + cpu * words * 8);
}

static void fill(u32 cpu)
{
	u64 *a = area(cpu), x = 0x9e3779b97f4a7c15ull * (cpu + 1);
	for (u64 i = 0; i < words; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		a[i] = x;
	}
}

static void mix(u32 cpu, u64 from, u64 to)
{
	u64 *a = area(cpu), m = words - 1;
	for (u64 r = from; r < to; r++)
		for (u64 i = 0; i < words; i++) {
			u64 v = a[i] ^ a[(i * 7 + r + 1) & m];
			a[i] = ((v << 13) | (v >> 51)) + i + r;
		}
}

static u64 digest(u32 cpu)
{
	u64 *a = area(cpu), h = 0xcbf29ce484222325ull;
	for (u64 i = 0; i < words; i++)
		h = (h ^ a[i]) * 0x100000001b3ull;
	return h;
}

static void wait_ticks(u32 cpu)
{
	while (ticks[cpu] < min_ticks)
		;
	ticks_ok[cpu] = ticks[cpu] >= min_ticks;
}

static void work(u32 cpu)
{
	fill(cpu);
	mix(cpu, 0, rounds / 2);
	__atomic_fetch_add(&phase1_done, 1, __ATOMIC_SEQ_CST);
	while (!phase2_go)
		;
	mix(cpu, rounds / 2, rounds);
	sums[cpu] = digest(cpu);
	wait_ticks(cpu);
	__atomic_fetch_add(&phase2_done, 1, __ATOMIC_SEQ_CST);
}

void ap_main(void)
{
	u32 cpu = lapic_id();
	__atomic_fetch_add(&ap_started, 1, __ATOMIC_SEQ_CST);
	if (cpu >= ncpus)
		return;
	start_timer();
	work(cpu);
}

static bool wait_all(volatile u32 *counter, u32 n)
{
	while (*counter < n)
		;
	return *counter >= n;
}

/* Poll COM1 for one byte. */
static char wait_key(void)
{
	while (!(inb(COM1 + 5) & LSR_DR))
		;
	return inb(COM1);
}

int main(void)
{
	arg_u64("words=", &words);
	arg_u64("rounds=", &rounds);
	arg_u64("ticks=", &min_ticks);
	if (words < 64 || (words & (words - 1))) {
		printf("bad argument: words=%lu is not a power of two >= 64\n", words);
		return EXIT_BAD_ARGS;
	}
	ncpus = fwcfg_read(FW_CFG_NB_CPUS, 2);
	if (ncpus < 1 || ncpus > MAX_CPUS) {
		printf("bad CPU count %u\n", ncpus);
		return EXIT_BAD_ARGS;
	}
	printf("checksum guest: %u CPUs, %lu words each, %lu rounds, %lu ticks\n", ncpus, words,
	       rounds, min_ticks);
	/* Mask the 8259s: firmware left the PIT's IRQ 0 on vector 8. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	u64 pit_count;
	if (arg_str("pit-off"))
		pit_stop();
	else if (arg_u64("pit-count=", &pit_count))
		pit_periodic(pit_count);
	set_irq_handler(TIMER_VECTOR, tick);
	start_timer();
	if (ncpus > 1) {
		start_aps();
	}

	fill(0);
	mix(0, 0, rounds / 2);
	__atomic_fetch_add(&phase1_done, 1, __ATOMIC_SEQ_CST);
	report(wait_all(&phase1_done, ncpus), "phase-1-all-cpus");
	printf("phase 1 done\n");
	if (arg_str("wait")) {
		printf("waiting for a key\n");
		printf("key: %c\n", wait_key());
	}
	if (arg_str("migrate-skip")) {
		printf("Skipped VM migration (quiet)\n");
		wait_key();
		printf("migration skipped\n");
	}
	u64 migrations = 0;
	arg_u64("migrate=", &migrations);
	for (u64 m = 0; m < migrations; m++) {
		printf("Now migrate the VM, then press a key to continue...\n");
		wait_key();
		printf("migration %lu done\n", m + 1);
	}
	bool continuous = arg_str("continuous");
	if (continuous) {
		printf("Begin continuous migration\n");
		wait_key();
	}
	phase2_go = 1;
	mix(0, rounds / 2, rounds);
	sums[0] = digest(0);
	wait_ticks(0);
	__atomic_fetch_add(&phase2_done, 1, __ATOMIC_SEQ_CST);
	report(wait_all(&phase2_done, ncpus), "phase-2-all-cpus");
	if (continuous) {
		printf("End continuous migration\n");
		printf("End continuous migration (quiet)\n");
		wait_key();
		printf("continuous migration done\n");
	}

	u64 total = 0;
	bool all_ticked = true;
	for (u32 c = 0; c < ncpus; c++) {
		printf("cpu %u checksum 0x%016lx\n", c, sums[c]);
		total = (total ^ sums[c]) * 0x100000001b3ull;
		all_ticked &= ticks_ok[c];
	}
	printf("checksum: 0x%016lx\n", total);
	report(all_ticked, "timer-ticks-on-every-cpu");
	return report_summary();
}
