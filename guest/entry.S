/* Ring-0 part of the test guest: PVH entry, long mode, descriptor tables,
 * interrupt handlers, and the drop to ring 3.
 *
 * On this project's hosts KVM runs CPL-0 code through its instruction emulator
 * (about a million instructions a second), so everything here is kept to a
 * few dozen instructions per CPU: the page tables, GDT, TSSes and IDT are
 * static data built by the assembler, and all real work (LAPIC programming,
 * serial output, memory stamping) happens in ring 3, which runs natively.
 *
 * Ring 3 reaches ring 0 through a service call: `ud2` with a service code in
 * %ecx, handled by the #UD handler. Under PVM (this project's KVM, which runs
 * guest ring 3 in hardware ring 3) `int n` from ring 3 raises #UD instead of
 * reaching its gate, and ring 3 cannot do port I/O itself (IOPL is forced to
 * 0, the TSS I/O bitmap is not the hardware's); an exception reaches ring 0 on
 * every x86 host. A port access is a VM exit anyway, and console output is
 * sparse. */

#include "layout.h"

#define CR0_PE 0x1
#define CR0_PG 0x80000000
#define CR4_PAE 0x20
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define RFLAGS_RESERVED 0x2
#define RFLAGS_IF 0x200

/* Page-table entry bits. Accessed/dirty are preset so the MMU never has to
 * write them back (each write would go through the shadow-paging slow path). */
#define PTE_PRESENT 0x1
#define PTE_WRITE 0x2
#define PTE_USER 0x4
#define PTE_PWT 0x8
#define PTE_PCD 0x10
#define PTE_ACCESSED 0x20
#define PTE_DIRTY 0x40
#define PTE_LARGE 0x80
#define PTE_TABLE (PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED)
#define PTE_2M (PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED | PTE_DIRTY | PTE_LARGE)
#define IDENTITY_MAP_GIB 64
/* 2 MiB pages holding the IOAPIC (0xfec00000) and the LAPIC (0xfee00000). */
#define MMIO_PAGE_IOAPIC (0xfec00000 >> 21)
#define MMIO_PAGE_LAPIC (0xfee00000 >> 21)

/* Exceptions for which the CPU pushes an error code. */
#define HAS_ERROR_CODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || (v) == 21 || (v) == 29 || (v) == 30)

/* ---------------------------------------------------------------------------
 * Xen PVH note: the VMM (or QEMU) enters at pvh_start32 in 32-bit protected
 * mode, paging off, with %ebx = physical address of struct hvm_start_info. */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4                 /* name size, "Xen\0" */
	.long 4                 /* descriptor size */
	.long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_start32

/* ---------------------------------------------------------------------------
 * .boot is placed at GUEST_IMAGE_BASE by the linker script (which asserts it),
 * so every address in it is known to the assembler as a constant. */
	.section .boot, "awx"
	.code64

/* Interrupt vector stubs, 16 bytes each: stub v is at GUEST_IMAGE_BASE + 16 v. */
	.globl boot_vector_stubs
boot_vector_stubs:
vector = 0
.rept 256
	.if vector == TIMER_VECTOR
	jmp timer_interrupt
	.elseif vector == INVALID_OPCODE_VECTOR
	jmp invalid_opcode      /* also the ring-3 service call */
	.elseif vector == SPURIOUS_VECTOR
	iretq                   /* spurious interrupts take no EOI */
	.else
	.if !HAS_ERROR_CODE(vector)
	pushq $0
	.endif
	pushq $vector
	jmp fault_entry
	.endif
	.org boot_vector_stubs + (vector + 1) * BOOT_VECTOR_STUB_SIZE, 0xcc
vector = vector + 1
.endr

/* Per-CPU 64-bit TSSes: only RSP0 matters (the ring-0 stack for interrupts
 * from ring 3). No I/O bitmap: ring 3 does port I/O through the gates. */
	.org boot_vector_stubs + BOOT_TSS_OFFSET
cpu = 0
.rept GUEST_MAX_CPUS
	.long 0
	.quad ring0_stacks + (cpu + 1) * RING0_STACK_SIZE /* RSP0 */
	.quad 0, 0              /* RSP1, RSP2 */
	.quad 0                 /* reserved */
	.quad 0, 0, 0, 0, 0, 0, 0 /* IST1-7 */
	.quad 0                 /* reserved */
	.word 0
	.word 104               /* I/O map base beyond the limit: no bitmap */
	.org boot_vector_stubs + BOOT_TSS_OFFSET + (cpu + 1) * BOOT_TSS_STRIDE, 0
cpu = cpu + 1
.endr

/* IDT: interrupt gates (IF cleared on entry) to the stubs. */
	.org boot_vector_stubs + BOOT_IDT_OFFSET
idt:
vector = 0
.rept 256
handler = GUEST_IMAGE_BASE + vector * BOOT_VECTOR_STUB_SIZE
	.word handler & 0xffff
	.word KERNEL_CS
	.byte 0                 /* no IST */
	.byte 0x8e              /* present, DPL 0, 64-bit interrupt gate */
	.word (handler >> 16) & 0xffff
	.long 0, 0
vector = vector + 1
.endr
idt_end:

	.org boot_vector_stubs + BOOT_GDT_OFFSET
gdt:
	.quad 0
	.quad 0x00af9a000000ffff /* KERNEL_CS: 64-bit code, DPL 0 */
	.quad 0x00cf92000000ffff /* KERNEL_DS */
	.quad 0x00cff2000000ffff /* USER_DS: DPL 3 */
	.quad 0x00affa000000ffff /* USER_CS: 64-bit code, DPL 3 */
cpu = 0
.rept GUEST_MAX_CPUS        /* TSS descriptors: one per CPU, as ltr marks them busy */
tss = GUEST_IMAGE_BASE + BOOT_TSS_OFFSET + cpu * BOOT_TSS_STRIDE
	.word 103               /* limit */
	.word tss & 0xffff
	.byte (tss >> 16) & 0xff
	.byte 0x89              /* present, available 64-bit TSS */
	.byte 0
	.byte (tss >> 24) & 0xff
	.long 0, 0
cpu = cpu + 1
.endr
gdt_end:

	.balign 8
gdt_pointer:
	.word gdt_end - gdt - 1
	.quad gdt
	.balign 8
idt_pointer:
	.word idt_end - idt - 1
	.quad idt

/* ---------------------------------------------------------------------------
 * Entry. Every vCPU starts here with the same %ebx; .bss is not cleared here
 * (the loader zero-fills it, and other CPUs may already be using it). */
	.code32
	.globl pvh_start32
pvh_start32:
	mov %ebx, %esi          /* hvm_start_info, handed to ring 3 */
	mov $1, %eax
	cpuid
	shr $24, %ebx           /* initial APIC id = CPU index */
	mov %ebx, %edi
	cmp $GUEST_MAX_CPUS, %edi
	jae park32
	lgdt gdt_pointer
	mov $pml4, %eax
	mov %eax, %cr3
	mov %cr4, %eax
	or $CR4_PAE, %eax
	mov %eax, %cr4
	mov $MSR_EFER, %ecx
	rdmsr
	or $EFER_LME, %eax
	wrmsr
	mov %cr0, %eax
	or $(CR0_PG | CR0_PE), %eax
	mov %eax, %cr0
	ljmp $KERNEL_CS, $start64
park32:
	hlt
	jmp park32

	.code64
start64:
	/* %edi = CPU index, %esi = hvm_start_info: also ring 3's arguments. The
	 * upper halves are undefined after the switch from 32-bit code. */
	mov %edi, %edi
	mov %esi, %esi
	mov %edi, %eax
	shl $RING0_STACK_SHIFT, %rax
	lea ring0_stacks + RING0_STACK_SIZE(%rax), %rsp
	mov %edi, %eax
	shl $4, %eax
	add $TSS_SELECTOR_BASE, %eax
	ltr %ax
	lidt idt_pointer
	mov %edi, %eax
	shl $USER_STACK_SHIFT, %rax
	/* -8: guest_main is entered as if called (rsp + 8 16-byte aligned). */
	lea user_stacks + USER_STACK_SIZE - 8(%rax), %rcx
	pushq $USER_DS
	pushq %rcx
	pushq $(RFLAGS_RESERVED | RFLAGS_IF)
	pushq $USER_CS
	pushq $guest_main
	iretq

/* Timer tick: count it in the per-CPU word at the stack base, EOI. */
timer_interrupt:
	push %rax
	mov %rsp, %rax
	and $-RING0_STACK_SIZE, %rax
	incq (%rax)
	mov $LAPIC_EOI, %eax
	movl $0, (%rax)
	pop %rax
	iretq

/* #UD. A `ud2` with a service code in %ecx is a service call from ring 3
 * (the codes are magic numbers, so a genuine #UD is not mistaken for one):
 *   SERVICE_YIELD: %rax = the tick count ring 3 has seen. Sleeps until the
 *     next tick unless one already arrived: the check and `sti; hlt` run with
 *     IF=0, and sti's shadow covers hlt, so no tick is lost. Clobbers %rcx.
 *   SERVICE_PORT_OUT: outb %al, %dx.
 *   SERVICE_PORT_IN: inb %dx, %al. */
invalid_opcode:
	cmp $SERVICE_YIELD, %ecx
	je 1f
	cmp $SERVICE_PORT_OUT, %ecx
	je 3f
	cmp $SERVICE_PORT_IN, %ecx
	je 4f
	pushq $0
	pushq $INVALID_OPCODE_VECTOR
	jmp fault_entry
1:	addq $2, (%rsp)         /* resume after the ud2 */
	mov %rsp, %rcx
	and $-RING0_STACK_SIZE, %rcx
	cmp (%rcx), %rax
	jne 2f
	sti
	hlt
2:	iretq
3:	addq $2, (%rsp)
	outb %al, %dx
	iretq
4:	addq $2, (%rsp)
	inb %dx, %al
	iretq

/* Faults: stack holds vector, error code, then the CPU's frame. */
fault_entry:
	mov %rsp, %rdi
	mov %cr2, %rsi
	and $-16, %rsp
	call guest_fault_report /* reports on the serial port, requests exit */
2:	cli
	hlt
	jmp 2b

/* ---------------------------------------------------------------------------
 * Identity map of the first 64 GiB with 2 MiB pages, user-accessible so
 * ring 3 reaches all RAM and the LAPIC/IOAPIC; the two MMIO pages uncached. */
	.section .data.page_tables, "aw"
	.balign 4096
pml4:
	.quad pdpt + PTE_TABLE
	.fill 511, 8, 0
pdpt:
gib = 0
.rept IDENTITY_MAP_GIB
	.quad page_directories + gib * 4096 + PTE_TABLE
gib = gib + 1
.endr
	.fill 512 - IDENTITY_MAP_GIB, 8, 0
page_directories:
page = 0
.rept IDENTITY_MAP_GIB * 512
	.if (page == MMIO_PAGE_IOAPIC) || (page == MMIO_PAGE_LAPIC)
	.quad (page << 21) | PTE_2M | PTE_PCD | PTE_PWT
	.else
	.quad (page << 21) | PTE_2M
	.endif
page = page + 1
.endr

	.section .bss.stacks, "aw", @nobits
	.balign RING0_STACK_SIZE
	.globl ring0_stacks
ring0_stacks:
	.skip GUEST_MAX_CPUS * RING0_STACK_SIZE
	.balign 16
	.globl user_stacks
user_stacks:
	.skip GUEST_MAX_CPUS * USER_STACK_SIZE

	.section .note.GNU-stack, "", @progbits
