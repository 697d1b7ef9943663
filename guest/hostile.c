/* The hostile test guest (hostile-guest.elf): a guest that treats the
 * shared-region protocol (protocol.h) as an attack surface. It boots like
 * the test guest (entry.S drops every vCPU into guest_main in ring 3), finds
 * the VMM's shared region and then, on every LAPIC timer tick of vCPU 0,
 * rewrites EVERY field of struct vmm_guest_shared with extreme values that
 * change every few ms: 0, 1, 2^63, 2^63-1, 2^64-1, ring sizes and their
 * neighbours, random words. Some epochs are targeted rather than random:
 *   - counters at 2^64-1 (heartbeat, sweep_passes, verify_seq);
 *   - counters that jump backwards;
 *   - a plausible-looking heartbeat and sweep ring with TSCs that are wrong,
 *     so that a VMM gets past "has it beaten?" and computes with garbage;
 *   - verify answers that mirror verify_request (so they look like answers)
 *     with page counts that cannot be right;
 *   - the TSC rate toggling between 0 and 1000 kHz every epoch.
 * It never stops doing so. It stamps no RAM and verifies nothing: the VMM
 * must survive it, not measure it. Other vCPUs park. Without a VMM shared
 * region (QEMU) it attacks a structure in its own .bss, which harms nobody. */

#include <stddef.h>
#include <stdint.h>

#include "arch.h"
#include "console.h"
#include "layout.h"
#include "protocol.h"
#include "pvh.h"

_Static_assert(GUEST_MAX_CPUS == VMM_GUEST_MAX_VCPUS, "layout.h and protocol.h disagree");

#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_DIVIDE 0x3e0
#define LAPIC_SVR_ENABLE 0x100
#define LAPIC_LVT_MASKED 0x10000
#define LAPIC_TIMER_PERIODIC 0x20000
#define LAPIC_DIVIDE_BY_1 0xb
#define TICK_NS 1000000u /* 1 ms at KVM's 1 GHz LAPIC bus clock */
#define MAX_MEMMAP_ENTRIES 128

extern char ring0_stacks[];

enum epoch_kind {
  EPOCH_RANDOM_EXTREMES, /* every word from the table or random */
  EPOCH_ALL_ONES,        /* every counter at 2^64-1, TSC rate 0 */
  EPOCH_BACKWARDS,       /* counters far below what they were */
  EPOCH_PLAUSIBLE,       /* counters that count, with nonsense TSCs and answers */
  EPOCH_KINDS,
};

static const uint64_t extremes[] = {
    0,
    1,
    2,
    UINT64_MAX,
    UINT64_MAX - 1,
    1ULL << 63,
    (1ULL << 63) - 1,
    1ULL << 32,
    (1ULL << 32) - 1,
    VMM_GUEST_MAX_VCPUS,
    VMM_GUEST_MAX_VCPUS + 1,
    VMM_GUEST_HEARTBEAT_RING - 1,
    VMM_GUEST_HEARTBEAT_RING,
    VMM_GUEST_HEARTBEAT_RING + 1,
    VMM_GUEST_SWEEP_RING - 1,
    VMM_GUEST_SWEEP_RING,
    1000, /* a TSC rate of 1 MHz */
};
#define EXTREMES (sizeof(extremes) / sizeof(extremes[0]))

static struct vmm_guest_shared local_shared;
static volatile struct vmm_guest_shared *shared;
static uint64_t random_state;
static uint64_t epoch;
static uint64_t epoch_kind;
static uint64_t epoch_ticks_left;
static uint64_t counter; /* the plausible epochs' heartbeat and sweep count */

static volatile uint64_t *cpu_tick_counter(uint64_t cpu) {
  return (volatile uint64_t *)(ring0_stacks + cpu * RING0_STACK_SIZE);
}

static inline void yield_until_tick_after(uint64_t seen) {
  uint64_t service = SERVICE_YIELD; /* clobbered */
  __asm__ volatile("ud2" : "+c"(service) : "a"(seen) : "memory", "cc");
}

static uint64_t next_random(void) {
  /* xorshift64*: never 0 once seeded with non-0. */
  random_state ^= random_state >> 12;
  random_state ^= random_state << 25;
  random_state ^= random_state >> 27;
  return random_state * 0x2545f4914f6cdd1dULL;
}

/* An extreme value or, one time in four, a random word. */
static uint64_t hostile_value(void) {
  const uint64_t r = next_random();
  if ((r & 3) == 0) return next_random();
  return extremes[(r >> 2) % EXTREMES];
}

static void lapic_start_timer(void) {
  mmio_write32(LAPIC_BASE + LAPIC_SVR, LAPIC_SVR_ENABLE | SPURIOUS_VECTOR);
  mmio_write32(LAPIC_BASE + LAPIC_LVT_LINT0, LAPIC_LVT_MASKED);
  mmio_write32(LAPIC_BASE + LAPIC_TIMER_DIVIDE, LAPIC_DIVIDE_BY_1);
  mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, LAPIC_TIMER_PERIODIC | TIMER_VECTOR);
  mmio_write32(LAPIC_BASE + LAPIC_TIMER_INITIAL, TICK_NS);
}

/* The VMM's region if the memory map lists it and it carries the magic. */
static volatile struct vmm_guest_shared *find_shared_region(const struct hvm_start_info *start_info) {
  if (start_info->magic == HVM_START_MAGIC && start_info->version >= 1 && start_info->memmap_paddr != 0) {
    const volatile struct hvm_memmap_table_entry *entries =
        (const volatile struct hvm_memmap_table_entry *)(uintptr_t)start_info->memmap_paddr;
    uint32_t count = start_info->memmap_entries;
    if (count > MAX_MEMMAP_ENTRIES) count = MAX_MEMMAP_ENTRIES;
    for (uint32_t i = 0; i < count; i++) {
      const uint64_t start = entries[i].addr, end = entries[i].addr + entries[i].size;
      if (entries[i].type != HVM_MEMMAP_TYPE_RAM && start <= VMM_GUEST_SHARED_GPA &&
          VMM_GUEST_SHARED_GPA + sizeof(struct vmm_guest_shared) <= end) {
        volatile struct vmm_guest_shared *candidate =
            (volatile struct vmm_guest_shared *)(uintptr_t)VMM_GUEST_SHARED_GPA;
        if (candidate->magic == VMM_GUEST_MAGIC) return candidate;
      }
    }
  }
  return &local_shared;
}

/* Every 64-bit word of the structure (the config part included), from the
 * table. Word-wise through a volatile pointer: each store really happens. */
static void scribble_everything(void) {
  volatile uint64_t *words = (volatile uint64_t *)shared;
  for (size_t i = 0; i < sizeof(struct vmm_guest_shared) / sizeof(uint64_t); i++) words[i] = hostile_value();
}

static void set_counters(uint64_t heartbeat, uint64_t sweep_passes, uint64_t verify_seq) {
  shared->heartbeat = heartbeat;
  shared->sweep_passes = sweep_passes;
  for (uint32_t i = 0; i < VMM_GUEST_MAX_VCPUS; i++) shared->vcpu[i].verify_seq = verify_seq;
}

/* Counters that advance like a real guest's, so a VMM waiting for "five
 * more heartbeats" or "a new sweep pass" reads the rings; what it finds
 * there is garbage, and the verify answers mirror the request with counts
 * that contradict each other. */
static void plausible_nonsense(void) {
  counter += 1 + (next_random() & 1);
  for (uint32_t i = 0; i < VMM_GUEST_HEARTBEAT_RING; i++) shared->heartbeat_ring_tsc[i] = hostile_value();
  for (uint32_t i = 0; i < VMM_GUEST_SWEEP_RING; i++) {
    shared->sweep_ring[i].start_tsc = hostile_value();
    shared->sweep_ring[i].end_tsc = hostile_value();
  }
  const uint64_t request = shared->verify_request;
  for (uint32_t i = 0; i < VMM_GUEST_MAX_VCPUS; i++) {
    volatile struct vmm_guest_vcpu *vcpu = &shared->vcpu[i];
    vcpu->verify_pages_checked = hostile_value();
    vcpu->verify_mismatches = hostile_value();
    vcpu->verify_first_mismatch_gpa = hostile_value();
    vcpu->online = next_random() & 1;
    vcpu->verify_seq = request;
  }
  shared->phase = VMM_GUEST_PHASE_RUNNING;
  shared->sweep_ms = 1 + (next_random() & 31);
  shared->heartbeat = counter;
  shared->sweep_passes = counter;
}

static void attack(void) {
  if (epoch_ticks_left == 0) {
    epoch++;
    epoch_kind = next_random() % EPOCH_KINDS;
    epoch_ticks_left = 1 + next_random() % 5; /* 1-5 ms */
  }
  epoch_ticks_left--;
  scribble_everything();
  switch (epoch_kind) {
    case EPOCH_ALL_ONES:
      set_counters(UINT64_MAX, UINT64_MAX, UINT64_MAX);
      break;
    case EPOCH_BACKWARDS:
      counter = next_random() & 0xff;
      set_counters(counter, counter, counter);
      break;
    case EPOCH_PLAUSIBLE:
      plausible_nonsense();
      break;
    default:
      break;
  }
  /* Whatever else happened: the TSC rate toggles, the sweep count is often
   * at its maximum, and the guest always "speaks" the protocol. */
  shared->tsc_khz = (epoch & 1) ? 1000 : 0;
  if (epoch_kind != EPOCH_PLAUSIBLE && (next_random() & 1)) shared->sweep_passes = UINT64_MAX;
  if (shared->phase == VMM_GUEST_PHASE_BOOTING && shared->heartbeat == 0) shared->heartbeat = UINT64_MAX;
}

static void __attribute__((noreturn)) park(uint64_t cpu) {
  volatile uint64_t *ticks = cpu_tick_counter(cpu);
  for (;;) yield_until_tick_after(*ticks);
}

void __attribute__((noreturn)) guest_main(uint64_t cpu, const struct hvm_start_info *start_info) {
  if (cpu != 0) park(cpu); /* no timer: sleeps for good */
  console_init();
  shared = find_shared_region(start_info);
  random_state = rdtsc() | 1;
  console_printf("hostile-guest: attacking the shared region %s 0x%lx\n",
                 shared == &local_shared ? "local at" : "from the VMM at", (uint64_t)(uintptr_t)shared);
  lapic_start_timer();
  volatile uint64_t *ticks = cpu_tick_counter(0);
  for (uint64_t iteration = 0;; iteration++) {
    const uint64_t seen = *ticks;
    attack();
    if (iteration % 10000 == 0) console_printf("hostile-guest: %lu epochs so far\n", epoch);
    console_drain(rdtsc() + 200000);
    yield_until_tick_after(seen);
  }
}

/* entry.S calls this in ring 0 on any exception. */
void __attribute__((noreturn)) guest_fault_report(const uint64_t *frame, uint64_t cr2) {
  console_fault_printf("hostile-guest: fault: vector %lu, error 0x%lx, rip 0x%lx, cr2 0x%lx\n", frame[0],
                       frame[1], frame[2], cr2);
  outb(VMM_GUEST_EXIT_PORT, 1);
  for (;;) __asm__ volatile("cli; hlt");
}
