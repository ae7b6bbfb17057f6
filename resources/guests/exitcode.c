/* Exit with the code given as code=N, to check that the VMM reports all 32 bits of the debug-exit write. */
#include "guest.h"

int main(void)
{
	u64 code = 0;
	arg_u64("code=", &code);
	if (code > 0xffffffffu) {
		printf("bad argument: code=%lu does not fit in 32 bits\n", code);
		return EXIT_BAD_ARGS;
	}
	printf("exiting with code %lu\n", code);
	exit((int)(u32)code);
}
