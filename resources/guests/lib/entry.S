/*
 * Boot code shared by all guests: multiboot v1 header, the 32-bit entry
 * that switches to long mode, the AP real-mode trampoline and the
 * interrupt stubs. Everything after the switch to long mode is C.
 */

#define KERNEL_CS64 0x08
#define KERNEL_DS 0x10
#define KERNEL_CS32 0x18
#define AP_STACK_SIZE 4096
#define MAX_CPUS 64
/* boot_kind values, as in guest.h */
#define BOOT_MULTIBOOT 1
#define BOOT_BZIMAGE 2
#define BOOT_PVH 3

	.section .text.boot, "ax"
	.code32

#ifndef LINUX_BOOT
	/* Flags 0: the loader takes addresses from the ELF program headers. */
	.align 4
mb_header:
	.long 0x1BADB002
	.long 0
	.long -0x1BADB002

	.globl start
start:
	/* Keep EBX before anything clobbers it: it is the only input we read. */
	movl %ebx, mb_info_addr
	movl $BOOT_MULTIBOOT, boot_kind
	jmp start32
#else
	/*
	 * Linux boot protocols (built with -DLINUX_BOOT). Offset 0 is where a
	 * bzImage's 32-bit entry would be; only the 64-bit one at 0x200 is
	 * offered (xloadflags XLF_KERNEL_64), so stop if anything enters here.
	 */
	.globl start
start:
	cli
	hlt
	jmp start

	/* PVH: 32-bit protected mode, paging off, EBX = hvm_start_info. */
	.globl pvh_start32
pvh_start32:
	movl %ebx, boot_info_addr
	movl $BOOT_PVH, boot_kind
	jmp start32

	/* bzImage 64-bit entry: long mode on the loader's identity map, RSI = boot_params. */
	.org 0x200
	.code64
startup_64:
	movl %esi, boot_info_addr
	movl $BOOT_BZIMAGE, boot_kind
	movq $boot_stack_top, %rsp
	lgdt gdt_desc
	/* Our own tables: the loader only promises to map the kernel, zero page and command line. */
	movq $pml4, %rax
	movq %rax, %cr3
	movw $KERNEL_DS, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	pushq $KERNEL_CS64
	pushq $start64
	lretq

	/* The Xen ELF note that offers the PVH entry (XEN_ELFNOTE_PHYS32_ENTRY = 18). */
	.pushsection .note.Xen, "a", @note
	.align 4
	.long 4, 4, 18
	.asciz "Xen"
	.long pvh_start32
	.popsection
	.code32
#endif

	/* 32-bit entries meet here with the boot kind recorded. */
start32:
	movl $boot_stack_top, %esp
	lgdtl gdt_desc
	ljmpl $KERNEL_CS32, $1f
1:	call load_data_segments
	call enable_long_mode
	ljmpl $KERNEL_CS64, $start64

	/* Reload the data segments from our GDT, not whatever the loader left. */
load_data_segments:
	movw $KERNEL_DS, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	ret

	/* PAE + identity-mapped 4 GiB + EFER.LME + CR0.PG, as kvm-unit-tests does. */
enable_long_mode:
	movl %cr4, %eax
	orl $(1 << 5), %eax
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx
	rdmsr
	orl $(1 << 8), %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax
	movl %eax, %cr0
	ret

	/* APs arrive here from the trampoline, in 32-bit protected mode. */
ap_start32:
	movw $KERNEL_DS, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	/* Take a private stack: the old value of ap_stack_next is its top. */
	movl $-AP_STACK_SIZE, %eax
	lock xaddl %eax, ap_stack_next
	movl %eax, %esp
	call enable_long_mode
	ljmpl $KERNEL_CS64, $ap_start64

	.code64
start64:
	movq $boot_stack_top, %rsp
	call boot_main
	/* boot_main never returns; stop here if it does. */
2:	cli
	hlt
	jmp 2b

ap_start64:
	movl %esp, %esp /* zero-extend: the upper half is undefined after the mode switch */
	call ap_boot_main
3:	cli
	hlt
	jmp 3b

/*
 * Real-mode AP trampoline. Copied to a page below 1 MiB and entered by
 * SIPI with CS = page >> 4, IP = 0; it only uses offsets relative to its
 * start so it runs wherever it is copied.
 */
	.code16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	movw %cs, %ax
	movw %ax, %ds
	lgdtl tramp_gdt_desc - ap_tramp_start
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $KERNEL_CS32, $ap_start32
	.align 4
	/* Own copy of the GDT descriptor: the real one is above 1 MiB, out of DS's reach. */
tramp_gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt
ap_tramp_end:

/*
 * One 16-byte stub per vector: push a dummy error code where the CPU does
 * not push one, push the vector number, and go to the common path, so
 * that every frame has the same layout (struct intr_frame).
 */
	.code64
	.text
	.align 16
	.globl isr_stubs
isr_stubs:
	.set vec, 0
	.rept 256
	.align 16
	.if !(vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30)
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	.set vec, vec + 1
	.endr

isr_common:
	/* Save the caller-saved registers; C preserves the rest. 15 slots keep RSP 16-byte aligned. */
	pushq %rax
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	movq %rsp, %rdi
	cld
	call interrupt_dispatch
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rax
	addq $16, %rsp
	iretq

	.data
	.globl mb_info_addr, boot_info_addr, boot_kind
mb_info_addr:
	.long 0
	/* Linux protocols: the zero page (bzImage) or hvm_start_info (PVH). */
boot_info_addr:
	.long 0
boot_kind:
	.long 0

	.align 8
gdt:
	.quad 0
	.quad 0x00af9a000000ffff /* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff /* 0x10: flat data */
	.quad 0x00cf9a000000ffff /* 0x18: flat 32-bit code */
gdt_end:

	.align 8
	.word 0
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

ap_stack_next:
	.long ap_stacks_top

	/* Identity map of the first 4 GiB with 2 MiB pages, so MMIO at its physical address. */
	.align 4096
pml4:
	.quad pdpt + 0x3 /* present, writable */
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0003
	.quad pd + 0x1003
	.quad pd + 0x2003
	.quad pd + 0x3003
	.fill 508, 8, 0
pd:
	.set page, 0
	.rept 2048
	.quad (page << 21) | 0x83 /* present, writable, 2 MiB page */
	.set page, page + 1
	.endr

	.bss
	.align 16
	.space 16384
boot_stack_top:
	.space AP_STACK_SIZE * MAX_CPUS
ap_stacks_top:

	.section .note.GNU-stack, "", @progbits
