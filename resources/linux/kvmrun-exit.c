/*
 * End the VM with a status through isa-debug-exit (port 0xf4): kvmrun and
 * QEMU then exit with (status << 1) | 1. Debian's cloud kernel has no
 * /dev/port, so the port is reached with ioperm() and outl(). Without the
 * device the write does nothing, and the VM is powered off instead.
 *
 * Usage: kvmrun-exit STATUS
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/io.h>
#include <sys/reboot.h>
#include <unistd.h>

#define DEBUG_EXIT_PORT 0xf4

int main(int argc, char **argv)
{
	unsigned int status = argc > 1 ? (unsigned int)strtoul(argv[1], NULL, 0) : 0;

	fflush(stdout);
	sync();
	if (ioperm(DEBUG_EXIT_PORT, 4, 1) != 0) {
		perror("kvmrun-exit: ioperm");
	} else {
		outl(status, DEBUG_EXIT_PORT);
	}
	reboot(RB_POWER_OFF);
	perror("kvmrun-exit: reboot");
	return 1;
}
