/* Smallest guest: prove that boot, serial output, the command line and exit work. */
#include "guest.h"

int main(void)
{
	printf("Hello from kvmrun guest\n");
	printf("cmdline: %s\n", cmdline());
	for (int i = 0; i < argc(); i++)
		printf("argv[%d]: %s\n", i, argv(i));
	return EXIT_PASS;
}
