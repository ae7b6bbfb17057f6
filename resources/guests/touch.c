/*
 * Memory for the snapshot benchmark: with `touch`, write one nonzero word
 * in every 4 KiB page of RAM from 16 MiB to the top of low memory (what
 * the multiboot info reports), so the pages are resident and not zero;
 * without it, leave RAM alone. Then print "ready" and wait for a byte on
 * COM1 before exiting, so the benchmark can snapshot a guest whose memory
 * is mostly touched or mostly untouched.
 *
 * The firmware leaves the PIT ticking periodically; stop it, as an OS
 * that takes its ticks from the LAPIC timer does, unless `pit` (leave it)
 * or `pit-count=N` (divide by N) is given: a periodic PIT can make the
 * vCPUs of a restored VM wait for the PIT's lost-tick policy switch.
 */
#include "guest.h"

#define COM1 0x3f8
#define LSR_DR 0x01
#define TOUCH_START (16ul << 20)

int main(void)
{
	u64 top = 0x100000ul + (u64)mb_info()->mem_upper * 1024;
	u64 pages = 0;
	u64 pit_count;
	if (arg_u64("pit-count=", &pit_count))
		pit_periodic(pit_count);
	else if (!arg_str("pit"))
		pit_stop();
	if (arg_str("touch")) {
		for (u64 a = TOUCH_START; a + 8 <= top; a += 4096, pages++)
			*(volatile u64 *)a = a | 1;
	}
	printf("touched %lu MiB\n", pages * 4096 >> 20);
	printf("ready\n");
	while (!(inb(COM1 + 5) & LSR_DR))
		;
	inb(COM1);
	return 0;
}
