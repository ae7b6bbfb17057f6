/*
 * A guest for the gdb stub's tests: a global to read and watch, a function
 * to break on, a loop to step through, and an exit status that tells
 * whether a debugger changed a global (3 untouched, 4 after gdb set `poke`
 * to 1). With spin=1 it calls bump() until gdb sets `poke`, for Ctrl-C.
 */
#include "guest.h"

volatile u64 counter;
volatile u32 poke;

__attribute__((noinline)) void bump(u64 by)
{
	counter += by;
}

int main(void)
{
	u64 spin = 0;
	arg_u64("spin=", &spin);
	printf("gdbtarget: start\n");
	if (spin) {
		printf("gdbtarget: spinning\n");
		while (!poke)
			bump(0);
	}
	for (int i = 1; i <= 5; i++)
		bump(i);
	printf("gdbtarget: counter=%lu\n", (unsigned long)counter);
	exit(poke ? 4 : 3);
}
