/*
 * A KVM test program for the guest: create a VM with one memory slot and
 * one vCPU, run real-mode code that writes 0x2a to port 0x10 and halts,
 * and check that KVM reports exactly that (KVM_EXIT_IO with the byte,
 * then KVM_EXIT_HLT). Inside a kvmrun guest this shows nested
 * virtualization end to end: /dev/kvm there is the guest kernel's own
 * KVM, running on the SVM that kvmrun exposes (--cpu host,+svm).
 *
 * Usage: kvmtest [hold]
 *
 * With "hold", the VM stays open after the check until a line arrives on
 * stdin ("kvmtest: VM held"), is then closed ("kvmtest: VM closed"), and
 * the program waits for one more line before it exits: a snapshot check
 * takes its snapshots in those two states.
 *
 * Exit status (distinct per failure; the guest's /init hands it to kvmrun,
 * which exits with (status << 1) | 1):
 *   0  the guest ran to the port write and the halt
 *   10 no /dev/kvm (the kernel has no KVM, or kvm_amd did not load)
 *   11 /dev/kvm cannot be opened for another reason
 *   12 KVM_GET_API_VERSION is not 12
 *   13 KVM_CREATE_VM failed
 *   14 guest memory or KVM_SET_USER_MEMORY_REGION failed
 *   15 KVM_CREATE_VCPU failed
 *   16 the vCPU's kvm_run cannot be mapped
 *   17 KVM_GET/SET_SREGS or KVM_SET_REGS failed
 *   18 KVM_RUN failed
 *   19 the first exit is not the port write of 0x2a to 0x10
 *   20 the second exit is not KVM_EXIT_HLT
 *   21 bad usage
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define GUEST_MEM 0x10000
#define CODE_GPA 0x1000
#define TEST_PORT 0x10
#define TEST_BYTE 0x2a

/* mov $0x2a, %al; out %al, $0x10; hlt */
static const uint8_t code[] = { 0xb0, TEST_BYTE, 0xe6, TEST_PORT, 0xf4 };

static int fail(int status, const char *what)
{
	fprintf(stderr, "kvmtest: FAIL (%d): %s: %s\n", status, what, strerror(errno));
	return status;
}

static const char *exit_name(uint32_t reason)
{
	switch (reason) {
	case KVM_EXIT_IO: return "KVM_EXIT_IO";
	case KVM_EXIT_HLT: return "KVM_EXIT_HLT";
	case KVM_EXIT_MMIO: return "KVM_EXIT_MMIO";
	case KVM_EXIT_SHUTDOWN: return "KVM_EXIT_SHUTDOWN";
	case KVM_EXIT_FAIL_ENTRY: return "KVM_EXIT_FAIL_ENTRY";
	case KVM_EXIT_INTERNAL_ERROR: return "KVM_EXIT_INTERNAL_ERROR";
	default: return "another exit";
	}
}

/* Wait for a line on stdin; end of input counts as one. */
static void wait_line(const char *what)
{
	char line[64];

	printf("kvmtest: %s; waiting for a line on stdin\n", what);
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		clearerr(stdin);
}

int main(int argc, char **argv)
{
	struct kvm_userspace_memory_region region;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_run *run;
	int kvm, vm, vcpu, hold = 0;
	long run_size;
	uint8_t *mem, byte;

	if (argc == 2 && strcmp(argv[1], "hold") == 0) {
		hold = 1;
	} else if (argc != 1) {
		fprintf(stderr, "usage: kvmtest [hold]\n");
		return 21;
	}

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0 && errno == ENOENT) {
		fprintf(stderr, "kvmtest: FAIL (10): no /dev/kvm\n");
		return 10;
	}
	if (kvm < 0)
		return fail(11, "open /dev/kvm");
	if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		return fail(12, "KVM_GET_API_VERSION");
	vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		return fail(13, "KVM_CREATE_VM");

	mem = mmap(NULL, GUEST_MEM, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return fail(14, "mmap guest memory");
	memcpy(mem + CODE_GPA, code, sizeof(code));
	region = (struct kvm_userspace_memory_region){
		.slot = 0,
		.guest_phys_addr = 0,
		.memory_size = GUEST_MEM,
		.userspace_addr = (uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		return fail(14, "KVM_SET_USER_MEMORY_REGION");

	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		return fail(15, "KVM_CREATE_VCPU");
	run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < (long)sizeof(*run))
		return fail(16, "KVM_GET_VCPU_MMAP_SIZE");
	run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		return fail(16, "mmap kvm_run");

	/* Real mode at 0:CODE_GPA: a flat code segment from address 0. */
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		return fail(17, "KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		return fail(17, "KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rflags = 0x2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		return fail(17, "KVM_SET_REGS");

	if (ioctl(vcpu, KVM_RUN, 0) < 0)
		return fail(18, "KVM_RUN (to the port write)");
	byte = *((uint8_t *)run + run->io.data_offset);
	if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT ||
	    run->io.size != 1 || run->io.port != TEST_PORT || run->io.count != 1 ||
	    byte != TEST_BYTE) {
		fprintf(stderr, "kvmtest: FAIL (19): first exit %u (%s), expected an out of 0x%x to port 0x%x\n",
			run->exit_reason, exit_name(run->exit_reason), TEST_BYTE, TEST_PORT);
		if (run->exit_reason == KVM_EXIT_FAIL_ENTRY)
			fprintf(stderr, "kvmtest: hardware entry failure reason 0x%llx\n",
				(unsigned long long)run->fail_entry.hardware_entry_failure_reason);
		if (run->exit_reason == KVM_EXIT_IO)
			fprintf(stderr, "kvmtest: it was %s of size %u, count %u, port 0x%x, byte 0x%x\n",
				run->io.direction == KVM_EXIT_IO_OUT ? "an out" : "an in", run->io.size,
				run->io.count, run->io.port, byte);
		return 19;
	}
	printf("kvmtest: KVM_EXIT_IO: out 0x%x to port 0x%x\n", byte, run->io.port);

	if (ioctl(vcpu, KVM_RUN, 0) < 0)
		return fail(18, "KVM_RUN (to the halt)");
	if (run->exit_reason != KVM_EXIT_HLT) {
		fprintf(stderr, "kvmtest: FAIL (20): second exit %u (%s), expected KVM_EXIT_HLT\n",
			run->exit_reason, exit_name(run->exit_reason));
		return 20;
	}
	printf("kvmtest: KVM_EXIT_HLT\n");
	printf("kvmtest: PASS\n");

	if (hold) {
		wait_line("VM held");
		munmap(run, run_size);
		munmap(mem, GUEST_MEM);
		close(vcpu);
		close(vm);
		close(kvm);
		wait_line("VM closed");
	}
	return 0;
}
