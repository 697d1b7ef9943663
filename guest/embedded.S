/* Embeds the test guest ELF into the host program (see embedded.h). The
 * assembler finds test-guest.elf through -I<guest build dir>. */
	.section .rodata.vmm_test_guest, "a"
	.balign 64
	.globl vmm_test_guest_elf
	.type vmm_test_guest_elf, @object
vmm_test_guest_elf:
	.incbin "test-guest.elf"
vmm_test_guest_elf_end:
	.size vmm_test_guest_elf, vmm_test_guest_elf_end - vmm_test_guest_elf

	.balign 8
	.globl vmm_test_guest_elf_size
	.type vmm_test_guest_elf_size, @object
vmm_test_guest_elf_size:
	.quad vmm_test_guest_elf_end - vmm_test_guest_elf
	.size vmm_test_guest_elf_size, 8

	.section .note.GNU-stack, "", @progbits
