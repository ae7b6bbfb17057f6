//! Every way a VM ends, with tiny hand-assembled multiboot images: the
//! exit status is the guest's verdict (see README, "Exit status").

mod common;

use common::{boot, kvm_available};

#[test]
fn debug_exit_takes_1_2_and_4_byte_writes() {
    if !kvm_available() {
        return;
    }
    // mov al, 5; out 0xf4, al
    boot(&[0xb0, 0x05, 0xe6, 0xf4, 0xeb, 0xfe], &[]).expect(11);
    // mov ax, 0x21; out 0xf4, ax
    boot(&[0x66, 0xb8, 0x21, 0x00, 0x66, 0xe7, 0xf4, 0xeb, 0xfe], &[]).expect(67);
    // mov eax, 0x7f; out 0xf7, eax is not aligned to the port block; use 0xf4.
    boot(&[0xb8, 0x7f, 0, 0, 0, 0xe7, 0xf4, 0xeb, 0xfe], &[]).expect(255);
}

#[test]
fn halt_with_interrupts_off_is_a_clean_exit() {
    if !kvm_available() {
        return;
    }
    // cli; hlt; jmp hlt
    boot(&[0xfa, 0xf4, 0xeb, 0xfd], &[]).expect(0);
    // Secondary vCPUs that were never started do not keep the VM alive.
    boot(&[0xfa, 0xf4, 0xeb, 0xfd], &["--smp", "2"]).expect(0);
}

#[test]
fn i8042_reset_ends_the_vm() {
    if !kvm_available() {
        return;
    }
    // mov al, 0xfe; out 0x64, al; jmp $
    boot(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe], &[]).expect(0);
}

#[test]
fn acpi_s5_powers_off() {
    if !kvm_available() {
        return;
    }
    // mov dx, 0x604; mov ax, (0 << 10) | (1 << 13); out dx, ax; jmp $
    boot(
        &[
            0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x20, 0x66, 0xef, 0xeb, 0xfe,
        ],
        &[],
    )
    .expect(0);
}

#[test]
fn triple_fault_is_a_crash_with_registers() {
    if !kvm_available() {
        return;
    }
    // lidt [null descriptor at 0x100000 + 32 + 16]; ud2; then 6 zero bytes.
    let mut code = vec![0x0f, 0x01, 0x1d];
    code.extend_from_slice(&(0x10_0000u32 + 32 + 16).to_le_bytes());
    code.extend_from_slice(&[0x0f, 0x0b]);
    code.resize(16, 0x90);
    code.extend_from_slice(&[0u8; 6]);
    boot(&code, &[])
        .expect(4)
        .err_has("vCPU 0 crashed")
        .err_has("rip=");
}

#[test]
fn timeout_ends_a_spinning_guest() {
    if !kvm_available() {
        return;
    }
    // jmp $
    boot(&[0xeb, 0xfe], &["--timeout", "0.5", "--smp", "2"]).expect(124);
}

#[test]
fn unowned_ports_read_all_ones() {
    if !kvm_available() {
        return;
    }
    // in al, 0x99; out 0xf4, al: status is (0xff << 1) | 1 truncated.
    boot(&[0xe4, 0x99, 0xe6, 0xf4, 0xeb, 0xfe], &[]).expect(255);
    // in eax, 0x9c (dword of nothing); shr eax, 25; out 0xf4, al -> 0x7f
    boot(&[0xe5, 0x9c, 0xc1, 0xe8, 0x19, 0xe6, 0xf4, 0xeb, 0xfe], &[]).expect(255);
}

#[test]
fn code_outside_ram_is_a_diagnosed_internal_error() {
    if !kvm_available() {
        return;
    }
    // mov eax, 0xd0000000; jmp eax: into the MMIO gap, where no device is.
    // Every KVM has to emulate the fetch there and cannot.
    let r = boot(&[0xb8, 0, 0, 0, 0xd0, 0xff, 0xe0], &[]);
    r.expect(4)
        .err_has("KVM internal error, suberror")
        .err_has("vCPU 0 at rip 0xd0000000 (cs 0x0008), 32-bit protected mode, CPL 0")
        .err_has("instruction: bytes unavailable")
        .err_has("host KVM: ");
}

#[test]
fn instruction_the_host_cannot_emulate_is_decoded() {
    if !kvm_available() {
        return;
    }
    // mov ebx, 7; popcnt eax, ebx; mov dx, 0xf4; out dx, eax: status 7.
    let code = [
        0xbb, 7, 0, 0, 0, 0xf3, 0x0f, 0xb8, 0xc3, 0x66, 0xba, 0xf4, 0x00, 0xef, 0xeb, 0xfe,
    ];
    let r = boot(&code, &[]);
    if common::kvm_module() == Some("kvm_pvm") {
        // KVM-PVM emulates guest ring-0 code and has no popcnt.
        r.expect(4)
            .err_has("instruction: popcnt eax, ebx   [f3 0f b8 c3] (from KVM)")
            .err_has("host KVM: kvm_pvm: KVM-PVM runs guest ring-0 code");
    } else {
        r.expect(7);
    }
}

#[test]
fn pci_config_ports_read_all_ones() {
    if !kvm_available() {
        return;
    }
    // Linux's type-1 probe: write 0x80000000 to 0xcf8 and read it back,
    // then read 0xcfc. With no PCI host bridge both dwords read all-ones,
    // so (cf8 & cfc) + 1 == 0 goes to isa-debug-exit: status 1.
    let code = [
        0x66, 0xba, 0xf8, 0x0c, // mov dx, 0xcf8
        0xb8, 0x00, 0x00, 0x00, 0x80, // mov eax, 0x80000000
        0xef, // out dx, eax
        0xed, // in eax, dx
        0x89, 0xc3, // mov ebx, eax
        0x66, 0xba, 0xfc, 0x0c, // mov dx, 0xcfc
        0xed, // in eax, dx
        0x21, 0xd8, // and eax, ebx
        0x40, // inc eax
        0x66, 0xba, 0xf4, 0x00, // mov dx, 0xf4
        0xef, // out dx, eax
        0xeb, 0xfe,
    ];
    boot(&code, &[]).expect(1);
}
