/* Never finish: a stand-in for a hung test, so the test host's timeout and clean-up can be checked. */
#include "guest.h"

int main(void)
{
	/* Mask the PIC so no stray timer interrupt can end the wait; the LAPIC timer is off. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	printf("hanging\n");
	/* Halt with interrupts enabled: the vCPU sleeps in KVM and costs no CPU, and the VMM cannot
	 * take it for the "halted with interrupts off" power-off case. */
	for (;;)
		__asm__ volatile("sti; hlt" ::: "memory");
}
