/* Constants shared by the test guest's ring-0 assembly (entry.S) and its C code.
 * Plain integer literals only: GAS parses this file too. */
#ifndef GUEST_LAYOUT_H
#define GUEST_LAYOUT_H

/* The image is linked here; entry.S relies on it to build the IDT and the TSS
 * descriptors as static data (their split address fields cannot be relocated). */
#define GUEST_IMAGE_BASE 0x100000

/* Must equal VMM_GUEST_MAX_VCPUS (checked in C). */
#define GUEST_MAX_CPUS 32

/* Offsets inside the .boot section, which starts at GUEST_IMAGE_BASE. */
#define BOOT_VECTOR_STUB_SIZE 16
#define BOOT_TSS_OFFSET 0x1000
#define BOOT_TSS_STRIDE 128
#define BOOT_IDT_OFFSET 0x2000
#define BOOT_GDT_OFFSET 0x3000

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS (0x18 | 3)
#define USER_CS (0x20 | 3)
#define TSS_SELECTOR_BASE 0x28 /* 16-byte descriptor per CPU */

#define TIMER_VECTOR 0x40
/* Ring 3 calls ring 0 with `ud2`, %ecx = one of these (entry.S, invalid_opcode). */
#define INVALID_OPCODE_VECTOR 6
#define SERVICE_YIELD 0x53565900
#define SERVICE_PORT_OUT 0x53565901
#define SERVICE_PORT_IN 0x53565902
#define SPURIOUS_VECTOR 0xff

/* Ring-0 stacks are aligned to their (power-of-two) size so that the handlers
 * find the per-CPU data at the stack base with one AND, without a per-CPU
 * segment. The first word of that base is the CPU's timer tick counter. */
#define RING0_STACK_SHIFT 13
#define RING0_STACK_SIZE (1 << RING0_STACK_SHIFT)
#define USER_STACK_SHIFT 14
#define USER_STACK_SIZE (1 << USER_STACK_SHIFT)

#define LAPIC_BASE 0xfee00000
#define LAPIC_EOI 0xfee000b0

#endif
