/*
 * Boot sector and setup header of a bzImage (the kernel's boot protocol
 * document, "The Real-Mode Kernel Header"), for guests linked with
 * bzimage.ld. One setup sector follows the boot sector; neither holds
 * code, since only the 64-bit entry is offered.
 */
	.section .bzhdr, "a"
	.org 0x1f1
	.byte 1                 /* setup_sects */
	.word 0                 /* root_flags */
	.long bz_syssize        /* syssize, 16-byte units */
	.word 0                 /* ram_size */
	.word 0xffff            /* vid_mode: normal */
	.word 0                 /* root_dev */
	.word 0xaa55            /* boot_flag */
	.word 0                 /* jump */
	.ascii "HdrS"           /* header */
	.word 0x020f            /* version 2.15 */
	.long 0                 /* realmode_swtch */
	.word 0                 /* start_sys_seg */
	.word 0                 /* kernel_version */
	.byte 0                 /* type_of_loader */
	.byte 0x01              /* loadflags: LOADED_HIGH */
	.word 0                 /* setup_move_size */
	.long 0x100000          /* code32_start */
	.long 0                 /* ramdisk_image */
	.long 0                 /* ramdisk_size */
	.long 0                 /* bootsect_kludge */
	.word 0                 /* heap_end_ptr */
	.byte 0                 /* ext_loader_ver */
	.byte 0                 /* ext_loader_type */
	.long 0                 /* cmd_line_ptr */
	.long 0x37ffffff        /* initrd_addr_max */
	.long 0x200000          /* kernel_alignment */
	.byte 0                 /* relocatable_kernel */
	.byte 12                /* min_alignment */
	.word 0x0001            /* xloadflags: XLF_KERNEL_64 */
	.long 2047              /* cmdline_size */
	.long 0                 /* hardware_subarch */
	.quad 0                 /* hardware_subarch_data */
	.long 0                 /* payload_offset */
	.long 0                 /* payload_length */
	.quad 0                 /* setup_data */
	.quad 0x100000          /* pref_address */
	.long bz_init_size      /* init_size */
	.long 0                 /* handover_offset */
	.long 0                 /* kernel_info_offset */
	.org 1024
	.section .note.GNU-stack, "", @progbits
