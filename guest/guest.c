/* Ring-3 part of the test guest (entry.S drops every vCPU here).
 *
 * Each vCPU owns a slice of the "stampable" pages (all RAM pages at or above
 * the end of the image, in address order). Paced by its LAPIC timer tick, it
 * first stamps its slice within a per-tick TSC budget, then keeps dirtying it,
 * and verifies it on request. vCPU 0 also publishes the heartbeat and, with
 * sweep-ms=N, times a read of every stampable page every N ms (the sweep).
 *
 * All state lives in guest RAM (.bss or the shared region), never only in
 * registers across ticks: the VMM may save the VM at any instruction and
 * resume it elsewhere. TSC values only bound work within one tick, so a TSC
 * that jumps (either way) across a save/restore just ends a chunk early. The
 * sweep alone times across ticks: a jump there makes a pass due at once and
 * its published span wrong (a backwards one shows as end < start). */

#include <stddef.h>
#include <stdint.h>

#include "arch.h"
#include "console.h"
#include "layout.h"
#include "protocol.h"
#include "pvh.h"

_Static_assert(GUEST_MAX_CPUS == VMM_GUEST_MAX_VCPUS, "layout.h and protocol.h disagree");

#define PAGE_SIZE 4096ULL
#define IDENTITY_MAP_LIMIT (64ULL << 30) /* what entry.S maps */
#define MAX_MEMMAP_ENTRIES 128
#define MAX_RAM_RANGES 64
#define CMDLINE_MAX 1024

#define LAPIC_ID 0x20
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE 0x3e0
#define LAPIC_SVR_ENABLE 0x100
#define LAPIC_LVT_MASKED 0x10000
#define LAPIC_TIMER_PERIODIC 0x20000
#define LAPIC_DIVIDE_BY_1 0xb
/* KVM's LAPIC timer runs at a 1 GHz bus clock: one count per ns at divide-by-1. */
#define LAPIC_COUNTS_PER_US 1000ULL

#define EXIT_CODE_DONE 0
#define EXIT_CODE_FAULT 1

#define DEFAULT_TICK_US 1000
#define DEFAULT_DIRTY_PAGES 16
#define DEFAULT_BUDGET_PERCENT 60
/* The sweep's share of vCPU 0's per-tick budget while a pass is due or in
 * progress; console output, dirtying and verification share the rest. Fixed,
 * so that a pass's duration scales only with what its page reads cost. */
#define SWEEP_BUDGET_PERCENT 50
#define SWEEP_MS_MAX 3600000 /* an hour: keeps ms * kHz far from overflowing */

extern char __image_end[];
extern char ring0_stacks[];

struct ram_range {
  uint64_t gpa;
  uint64_t pages;
};

/* Written once by vCPU 0 before config_ready is set; read-only afterwards. */
struct guest_config {
  volatile struct vmm_guest_shared *shared;
  int shared_from_vmm;
  const char *tsc_khz_source;
  uint64_t boot_tsc;
  uint64_t nr_vcpus;
  uint64_t seed;
  uint64_t tsc_khz;
  uint64_t tick_us;
  uint64_t dirty_pages_per_tick;
  uint64_t exit_after;
  uint64_t verify_every;
  uint64_t budget_percent;
  uint64_t budget_cycles;
  uint64_t sweep_ms;
  uint64_t sweep_period_cycles;
  uint64_t sweep_quantum_cycles; /* per tick, while a pass is due or in progress */
  uint64_t heartbeats_per_log;
  uint64_t ram_bytes;
  uint64_t pages_total;
  uint64_t nr_ranges;
  struct ram_range ranges[MAX_RAM_RANGES];
};

enum verify_kind { VERIFY_NONE = 0, VERIFY_REQUESTED, VERIFY_SELF };

/* Owned by one vCPU (other vCPUs only read `pass` and `stamp_done_tsc`).
 * The source of truth: the shared region only mirrors it. */
struct vcpu_state {
  uint64_t slice_first_page;
  uint64_t slice_pages;
  uint64_t pages_stamped;
  uint64_t stamp_done_tsc;
  uint64_t pass;   /* 0 while stamping; then the current dirtying pass (from 1) */
  uint64_t cursor; /* next page of the slice to dirty in this pass */
  uint64_t pages_dirtied;
  uint64_t iterations; /* loop iterations, one per tick served */
  uint64_t last_self_verify_iteration;

  /* The verification in progress. Dirtying pauses meanwhile, so pass and
   * cursor hold still and a chunked check sees one consistent state. */
  uint64_t verify_kind;
  uint64_t verify_target;
  uint64_t verify_position;
  uint64_t verify_mismatches;
  uint64_t verify_first_mismatch_gpa;
  uint64_t verify_first_found[2];
  uint64_t verify_first_expected[2];
  uint64_t verify_start_tsc;

  /* The last completed verify request, as published in vmm_guest_vcpu. */
  uint64_t verify_seq;
  uint64_t verify_pages_checked;
  uint64_t verify_result_mismatches;
  uint64_t verify_result_first_mismatch_gpa;
};

static struct guest_config config;
static volatile uint64_t config_ready;
/* Stands in for the VMM's shared region when there is none (e.g. QEMU). */
static struct vmm_guest_shared local_shared;
static struct vcpu_state vcpu_states[GUEST_MAX_CPUS];
static struct hvm_memmap_table_entry memmap_copy[MAX_MEMMAP_ENTRIES];
/* vCPU 0 only. */
static uint64_t heartbeat_count;
static uint64_t heartbeat_last_tsc;
static uint64_t heartbeat_max_gap; /* TSC cycles, since the last heartbeat line */
static uint64_t stamp_done_tsc;
static uint64_t exit_requested;

/* The sweep (vCPU 0 only): passes over all stampable pages, reading word 0. */
struct sweep_state {
  uint64_t active;    /* a pass is in progress */
  uint64_t passes;    /* completed (as published in sweep_passes) */
  uint64_t start_tsc; /* of the pass in progress, else of the latest one */
  uint64_t range;     /* the next page to read: config.ranges[range], page `offset` */
  uint64_t offset;
  uint64_t mismatches; /* pages of this pass whose word 0 was not their stamp */
  uint64_t first_mismatch_gpa;
  uint64_t last_cycles;     /* duration of the latest pass */
  uint64_t slowest_cycles;  /* of the passes since the last log line */
  uint64_t passes_at_log;
};
static struct sweep_state sweep;

/* ------------------------------------------------------------------------ */

/* The per-CPU word the ring-0 timer handler increments (entry.S). */
static volatile uint64_t *cpu_tick_counter(uint64_t cpu) {
  return (volatile uint64_t *)(ring0_stacks + cpu * RING0_STACK_SIZE);
}

/* Sleeps in ring 0 (a `ud2` service call) until the tick counter moves past `seen`. */
static inline void yield_until_tick_after(uint64_t seen) {
  uint64_t service = SERVICE_YIELD; /* clobbered */
  __asm__ volatile("ud2" : "+c"(service) : "a"(seen) : "memory", "cc");
}

static uint64_t tsc_to_ms(uint64_t cycles) {
  return config.tsc_khz ? cycles / config.tsc_khz : 0;
}

static uint64_t tsc_to_us(uint64_t cycles) {
  return config.tsc_khz ? cycles * 1000 / config.tsc_khz : 0;
}

static size_t string_length(const char *text) {
  size_t length = 0;
  while (text[length] != '\0') length++;
  return length;
}

static int strings_equal(const char *a, const char *b, size_t length) {
  for (size_t i = 0; i < length; i++)
    if (a[i] != b[i]) return 0;
  return 1;
}

/* ------------------------------------------------------------------------ */
/* Configuration (vCPU 0, once). */

static int parse_number(const char *text, size_t length, uint64_t *value) {
  uint64_t result = 0;
  if (length == 0) return 0;
  for (size_t i = 0; i < length; i++) {
    if (text[i] < '0' || text[i] > '9') return 0;
    result = result * 10 + (uint64_t)(text[i] - '0');
  }
  *value = result;
  return 1;
}

static void parse_option(const char *token, size_t length) {
  static const struct {
    const char *key;
    uint64_t *value;
  } options[] = {
      {"tick-us", &config.tick_us},
      {"dirty-pages", &config.dirty_pages_per_tick},
      {"exit-after", &config.exit_after},
      {"verify-every", &config.verify_every},
      {"budget-percent", &config.budget_percent},
      {"sweep-ms", &config.sweep_ms},
  };
  for (size_t i = 0; i < sizeof(options) / sizeof(options[0]); i++) {
    size_t key_length = string_length(options[i].key);
    if (length <= key_length || token[key_length] != '=' ||
        !strings_equal(token, options[i].key, key_length))
      continue;
    if (!parse_number(token + key_length + 1, length - key_length - 1, options[i].value))
      console_printf("test-guest: ignoring malformed option '%s' value\n", options[i].key);
    return;
  }
  /* Other tokens (a bootloader's console= and the like) are not ours. */
}

static void parse_cmdline(const char *cmdline) {
  size_t position = 0;
  while (position < CMDLINE_MAX && cmdline[position] != '\0') {
    while (cmdline[position] == ' ') position++;
    size_t start = position;
    while (position < CMDLINE_MAX && cmdline[position] != '\0' && cmdline[position] != ' ')
      position++;
    if (position > start) parse_option(cmdline + start, position - start);
  }
}

static uint64_t clamp(uint64_t value, uint64_t low, uint64_t high) {
  return value < low ? low : value > high ? high : value;
}

static void add_ram_range(uint64_t start, uint64_t end) {
  start = (start + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
  end &= ~(PAGE_SIZE - 1);
  if (end <= start) return;
  uint64_t pages = (end - start) / PAGE_SIZE;
  struct ram_range *last = config.nr_ranges ? &config.ranges[config.nr_ranges - 1] : NULL;
  if (last && last->gpa + last->pages * PAGE_SIZE == start) {
    last->pages += pages;
  } else if (config.nr_ranges < MAX_RAM_RANGES) {
    config.ranges[config.nr_ranges].gpa = start;
    config.ranges[config.nr_ranges].pages = pages;
    config.nr_ranges++;
  } else {
    console_printf("test-guest: too many RAM ranges, ignoring 0x%lx-0x%lx\n", start, end);
    return;
  }
  config.pages_total += pages;
}

/* Stampable pages: RAM pages at or above the end of the image and below the
 * identity-map limit, indexed in increasing address order. Also returns
 * whether a reserved entry holds the shared region. */
static int scan_memmap(const struct hvm_start_info *start_info) {
  uint32_t count = start_info->version >= 1 ? start_info->memmap_entries : 0;
  if (count == 0 || start_info->memmap_paddr == 0) {
    console_printf("test-guest: no PVH memory map: nothing to stamp\n");
    return 0;
  }
  if (count > MAX_MEMMAP_ENTRIES) {
    console_printf("test-guest: memory map has %u entries, using the first %u\n", count,
                   MAX_MEMMAP_ENTRIES);
    count = MAX_MEMMAP_ENTRIES;
  }
  /* Copy (the map may lie in RAM that gets stamped) and sort by address. */
  const volatile struct hvm_memmap_table_entry *entries =
      (const volatile struct hvm_memmap_table_entry *)(uintptr_t)start_info->memmap_paddr;
  for (uint32_t i = 0; i < count; i++) {
    struct hvm_memmap_table_entry entry;
    entry.addr = entries[i].addr;
    entry.size = entries[i].size;
    entry.type = entries[i].type;
    entry.reserved = 0;
    uint32_t j = i;
    for (; j > 0 && memmap_copy[j - 1].addr > entry.addr; j--) memmap_copy[j] = memmap_copy[j - 1];
    memmap_copy[j] = entry;
  }

  const uint64_t image_end = (uint64_t)(uintptr_t)__image_end;
  int shared_listed = 0;
  for (uint32_t i = 0; i < count; i++) {
    const struct hvm_memmap_table_entry *entry = &memmap_copy[i];
    uint64_t end = entry->addr + entry->size;
    if (entry->type == HVM_MEMMAP_TYPE_RAM) {
      config.ram_bytes += entry->size;
      uint64_t start = entry->addr > image_end ? entry->addr : image_end;
      if (end > IDENTITY_MAP_LIMIT) end = IDENTITY_MAP_LIMIT;
      add_ram_range(start, end);
    } else if (entry->addr <= VMM_GUEST_SHARED_GPA &&
               VMM_GUEST_SHARED_GPA + sizeof(struct vmm_guest_shared) <= end) {
      shared_listed = 1;
    }
  }
  if (config.ram_bytes > IDENTITY_MAP_LIMIT)
    console_printf("test-guest: RAM above 64 GiB is not mapped and not stamped\n");
  return shared_listed;
}

static void select_shared_region(int shared_listed) {
  volatile struct vmm_guest_shared *candidate =
      (volatile struct vmm_guest_shared *)(uintptr_t)VMM_GUEST_SHARED_GPA;
  if (shared_listed && candidate->magic == VMM_GUEST_MAGIC) {
    if (candidate->version == VMM_GUEST_PROTOCOL_VERSION) {
      config.shared = candidate;
      config.shared_from_vmm = 1;
      config.nr_vcpus = clamp(candidate->nr_vcpus, 1, GUEST_MAX_CPUS);
      config.seed = candidate->seed;
      config.tsc_khz = candidate->tsc_khz;
      return;
    }
    console_printf("test-guest: shared region has protocol version %u, want %u: ignoring it\n",
                   candidate->version, VMM_GUEST_PROTOCOL_VERSION);
  }
  /* The guest fills the config part itself (tsc_khz once measured), magic
   * last: a tool that finds the magic in guest RAM (QEMU's memory dump, say)
   * then finds the rest of the structure valid. */
  local_shared.version = VMM_GUEST_PROTOCOL_VERSION;
  local_shared.nr_vcpus = 1;
  local_shared.seed = vmm_guest_mix(rdtsc());
  local_shared.shared_size = sizeof(local_shared);
  compiler_barrier();
  local_shared.magic = VMM_GUEST_MAGIC;
  config.shared = &local_shared;
  config.nr_vcpus = 1;
  config.seed = local_shared.seed;
}

static void lapic_start_timer(void) {
  mmio_write32(LAPIC_BASE + LAPIC_SVR, LAPIC_SVR_ENABLE | SPURIOUS_VECTOR);
  /* After reset KVM routes the 8259 to the BSP's LINT0 as ExtINT; an
   * unprogrammed PIC would deliver on exception vectors. */
  mmio_write32(LAPIC_BASE + LAPIC_LVT_LINT0, LAPIC_LVT_MASKED);
  mmio_write32(LAPIC_BASE + LAPIC_TIMER_DIVIDE, LAPIC_DIVIDE_BY_1);
  mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, LAPIC_TIMER_PERIODIC | TIMER_VECTOR);
  mmio_write32(LAPIC_BASE + LAPIC_TIMER_INITIAL, (uint32_t)(config.tick_us * LAPIC_COUNTS_PER_US));
}

/* Without a shared region: measures the TSC against the running LAPIC timer
 * (1 count per ns). CPUID is no help in ring 3: under PVM it runs natively and
 * returns the host's leaves. Takes
 * the lowest of three rounds: a round in which the vCPU was descheduled for a
 * whole timer period undercounts nanoseconds, so it can only read high. */
static uint64_t tsc_khz_from_lapic_timer(void) {
  const uint64_t period = config.tick_us * LAPIC_COUNTS_PER_US;
  const uint64_t round_ns = period / 2 < 2000000 ? period / 2 : 2000000;
  uint64_t best = UINT64_MAX;
  for (int round = 0; round < 3; round++) {
    uint64_t count0 = mmio_read32(LAPIC_BASE + LAPIC_TIMER_CURRENT);
    uint64_t tsc0 = rdtsc();
    uint64_t elapsed_ns, tsc1;
    do {
      uint64_t count1 = mmio_read32(LAPIC_BASE + LAPIC_TIMER_CURRENT);
      tsc1 = rdtsc();
      elapsed_ns = count1 <= count0 ? count0 - count1 : count0 + period - count1;
    } while (elapsed_ns < round_ns);
    uint64_t khz = (tsc1 - tsc0) * 1000000 / elapsed_ns;
    if (khz < best) best = khz;
  }
  return best;
}

static void configure(const struct hvm_start_info *start_info) {
  config.tick_us = DEFAULT_TICK_US;
  config.dirty_pages_per_tick = DEFAULT_DIRTY_PAGES;
  config.budget_percent = DEFAULT_BUDGET_PERCENT;

  if (start_info->magic != HVM_START_MAGIC) {
    console_printf("test-guest: bad hvm_start_info magic 0x%x at 0x%lx\n", start_info->magic,
                   (uint64_t)(uintptr_t)start_info);
  } else {
    if (start_info->cmdline_paddr != 0)
      parse_cmdline((const char *)(uintptr_t)start_info->cmdline_paddr);
    select_shared_region(scan_memmap(start_info));
  }
  if (config.shared == NULL) select_shared_region(0);

  /* 32-bit LAPIC initial count: at most ~4.29 s. */
  config.tick_us = clamp(config.tick_us, 20, 4000000);
  config.budget_percent = clamp(config.budget_percent, 1, 95);
  if (config.sweep_ms > SWEEP_MS_MAX) config.sweep_ms = SWEEP_MS_MAX;
  if (config.sweep_ms != 0 && config.pages_total == 0) {
    console_printf("test-guest: no stampable RAM: nothing to sweep\n");
    config.sweep_ms = 0;
  }
  config.heartbeats_per_log = 1000000 / config.tick_us;
  if (config.heartbeats_per_log == 0) config.heartbeats_per_log = 1;
}

static void determine_tsc_khz(void) {
  if (config.tsc_khz != 0) {
    config.tsc_khz_source = "shared region";
  } else {
    config.tsc_khz = tsc_khz_from_lapic_timer();
    config.tsc_khz_source = "LAPIC timer";
    /* Our own structure: readers need it to turn its TSC values into time. */
    config.shared->tsc_khz = config.tsc_khz;
  }
  config.budget_cycles = config.tsc_khz * config.tick_us / 1000 * config.budget_percent / 100;
  if (config.budget_cycles == 0) config.budget_cycles = 1;
  config.sweep_period_cycles = config.sweep_ms * config.tsc_khz;
  config.sweep_quantum_cycles = config.budget_cycles * SWEEP_BUDGET_PERCENT / 100;
  if (config.sweep_quantum_cycles == 0) config.sweep_quantum_cycles = 1;
}

/* ------------------------------------------------------------------------ */
/* Per-vCPU work. */

static uint64_t page_gpa(uint64_t index) {
  for (uint64_t i = 0; i < config.nr_ranges; i++) {
    if (index < config.ranges[i].pages) return config.ranges[i].gpa + index * PAGE_SIZE;
    index -= config.ranges[i].pages;
  }
  return UINT64_MAX; /* callers stay below pages_total */
}

static int budget_spent(uint64_t deadline_tsc) {
  return rdtsc() >= deadline_tsc;
}

/* Word 0 = stamp; word 1 = 0 ("not dirtied yet": RAM need not start zeroed). */
static void stamp_some(struct vcpu_state *state, uint64_t deadline_tsc) {
  while (state->pages_stamped < state->slice_pages) {
    uint64_t gpa = page_gpa(state->slice_first_page + state->pages_stamped);
    volatile uint64_t *page = (volatile uint64_t *)(uintptr_t)gpa;
    page[0] = vmm_guest_page_stamp(gpa, config.seed);
    page[1] = 0;
    state->pages_stamped++;
    if (budget_spent(deadline_tsc)) break;
  }
  if (state->pages_stamped == state->slice_pages) {
    state->stamp_done_tsc = rdtsc();
    state->cursor = 0;
    /* Publishes stamp_done_tsc to vCPU 0. */
    __atomic_store_n(&state->pass, 1, __ATOMIC_RELEASE);
  }
}

static void dirty_some(struct vcpu_state *state, uint64_t deadline_tsc) {
  if (state->slice_pages == 0) return;
  for (uint64_t i = 0; i < config.dirty_pages_per_tick; i++) {
    uint64_t gpa = page_gpa(state->slice_first_page + state->cursor);
    ((volatile uint64_t *)(uintptr_t)gpa)[1] = vmm_guest_dirty_word(gpa, config.seed, state->pass);
    state->pages_dirtied++;
    if (++state->cursor == state->slice_pages) {
      state->cursor = 0;
      state->pass++;
    }
    if (budget_spent(deadline_tsc)) break;
  }
}

static uint64_t expected_dirty_word(const struct vcpu_state *state, uint64_t position,
                                    uint64_t gpa) {
  uint64_t pass = position < state->cursor ? state->pass : state->pass - 1;
  return pass == 0 ? 0 : vmm_guest_dirty_word(gpa, config.seed, pass);
}

static void verify_begin(struct vcpu_state *state, enum verify_kind kind, uint64_t target) {
  state->verify_target = target;
  state->verify_position = 0;
  state->verify_mismatches = 0;
  state->verify_first_mismatch_gpa = UINT64_MAX;
  state->verify_start_tsc = rdtsc();
  state->verify_kind = kind;
}

/* Returns whether the whole slice has been checked. */
static int verify_some(struct vcpu_state *state, uint64_t deadline_tsc) {
  while (state->verify_position < state->slice_pages) {
    uint64_t position = state->verify_position;
    uint64_t gpa = page_gpa(state->slice_first_page + position);
    const volatile uint64_t *page = (const volatile uint64_t *)(uintptr_t)gpa;
    uint64_t found[2] = {page[0], page[1]};
    uint64_t expected[2] = {vmm_guest_page_stamp(gpa, config.seed),
                            expected_dirty_word(state, position, gpa)};
    if (found[0] != expected[0] || found[1] != expected[1]) {
      if (state->verify_mismatches++ == 0) {
        state->verify_first_mismatch_gpa = gpa;
        state->verify_first_found[0] = found[0];
        state->verify_first_found[1] = found[1];
        state->verify_first_expected[0] = expected[0];
        state->verify_first_expected[1] = expected[1];
      }
    }
    state->verify_position++;
    if (budget_spent(deadline_tsc)) break;
  }
  return state->verify_position == state->slice_pages;
}

static void verify_finish(uint64_t cpu, struct vcpu_state *state) {
  uint64_t elapsed_ms = tsc_to_ms(rdtsc() - state->verify_start_tsc);
  if (state->verify_kind == VERIFY_REQUESTED) {
    state->verify_pages_checked = state->slice_pages;
    state->verify_result_mismatches = state->verify_mismatches;
    state->verify_result_first_mismatch_gpa = state->verify_first_mismatch_gpa;
    state->verify_seq = state->verify_target;
    console_printf("test-guest: verify %lu vcpu %lu: %lu pages checked, %lu mismatches, pass %lu "
                   "cursor %lu (%lu ms)\n",
                   state->verify_target, cpu, state->slice_pages, state->verify_mismatches,
                   state->pass, state->cursor, elapsed_ms);
  } else {
    console_printf("test-guest: self-verify vcpu %lu: %lu pages checked, %lu mismatches, pass %lu "
                   "cursor %lu (%lu ms)\n",
                   cpu, state->slice_pages, state->verify_mismatches, state->pass, state->cursor,
                   elapsed_ms);
  }
  if (state->verify_mismatches != 0)
    console_printf("test-guest: vcpu %lu first mismatch at gpa 0x%lx: words 0x%lx 0x%lx, "
                   "expected 0x%lx 0x%lx\n",
                   cpu, state->verify_first_mismatch_gpa, state->verify_first_found[0],
                   state->verify_first_found[1], state->verify_first_expected[0],
                   state->verify_first_expected[1]);
  state->verify_kind = VERIFY_NONE;
}

static void do_work(uint64_t cpu, struct vcpu_state *state, uint64_t deadline_tsc) {
  if (state->pass == 0) {
    stamp_some(state, deadline_tsc);
    return;
  }
  if (state->verify_kind == VERIFY_NONE) {
    uint64_t request = config.shared->verify_request;
    if (request != state->verify_seq) {
      verify_begin(state, VERIFY_REQUESTED, request);
    } else if (config.verify_every != 0 &&
               state->iterations - state->last_self_verify_iteration >= config.verify_every) {
      state->last_self_verify_iteration = state->iterations;
      verify_begin(state, VERIFY_SELF, 0);
    }
  }
  if (state->verify_kind != VERIFY_NONE) {
    if (verify_some(state, deadline_tsc)) verify_finish(cpu, state);
    return;
  }
  dirty_some(state, deadline_tsc);
}

static void publish_vcpu_status(uint64_t cpu, const struct vcpu_state *state) {
  volatile struct vmm_guest_vcpu *status = &config.shared->vcpu[cpu];
  status->ticks = *cpu_tick_counter(cpu);
  status->slice_first_page = state->slice_first_page;
  status->slice_pages = state->slice_pages;
  status->pages_stamped = state->pages_stamped;
  status->pass = state->pass;
  status->pages_dirtied = state->pages_dirtied;
  /* The results first, then the sequence number that publishes them. */
  status->verify_pages_checked = state->verify_pages_checked;
  status->verify_mismatches = state->verify_result_mismatches;
  status->verify_first_mismatch_gpa = state->verify_result_first_mismatch_gpa;
  compiler_barrier();
  status->verify_seq = state->verify_seq;
  status->online = 1;
}

/* ------------------------------------------------------------------------ */
/* vCPU 0: heartbeat and global status. */

static void publish_heartbeat(void) {
  volatile struct vmm_guest_shared *shared = config.shared;
  uint64_t tsc = rdtsc();
  uint64_t next = heartbeat_count + 1;
  shared->heartbeat_ring_tsc[next % VMM_GUEST_HEARTBEAT_RING] = tsc;
  shared->heartbeat_tsc = tsc;
  compiler_barrier();
  shared->heartbeat = next;
  heartbeat_count = next;
  /* A TSC that went backwards (a restore elsewhere) is no gap. */
  if (heartbeat_last_tsc != 0 && tsc > heartbeat_last_tsc &&
      tsc - heartbeat_last_tsc > heartbeat_max_gap)
    heartbeat_max_gap = tsc - heartbeat_last_tsc;
  heartbeat_last_tsc = tsc;
}

static uint64_t all_pages_stamped(void) {
  uint64_t stamped = 0;
  for (uint64_t cpu = 0; cpu < config.nr_vcpus; cpu++)
    stamped += __atomic_load_n(&vcpu_states[cpu].pages_stamped, __ATOMIC_RELAXED);
  return stamped;
}

/* The TSC at which the last vCPU finished stamping, or 0 while any is not. */
static uint64_t stamping_finished_tsc(void) {
  uint64_t latest = 0;
  for (uint64_t cpu = 0; cpu < config.nr_vcpus; cpu++) {
    const struct vcpu_state *state = &vcpu_states[cpu];
    if (__atomic_load_n(&state->pass, __ATOMIC_ACQUIRE) == 0) return 0;
    if (state->stamp_done_tsc > latest) latest = state->stamp_done_tsc;
  }
  return latest;
}

static void update_global_status(void) {
  volatile struct vmm_guest_shared *shared = config.shared;
  if (stamp_done_tsc == 0 && (stamp_done_tsc = stamping_finished_tsc()) != 0) {
    console_printf("test-guest: stamping finished: %lu pages in %lu ms\n", config.pages_total,
                   tsc_to_ms(stamp_done_tsc - config.boot_tsc));
  }
  shared->pages_total = config.pages_total;
  shared->boot_tsc = config.boot_tsc;
  shared->stamp_done_tsc = stamp_done_tsc;
  shared->phase = stamp_done_tsc ? VMM_GUEST_PHASE_RUNNING : VMM_GUEST_PHASE_STAMPING;
  shared->sweep_ms = config.sweep_ms;
}

/* ------------------------------------------------------------------------ */
/* vCPU 0: the sweep. Each pass reads word 0 of every stampable page (all
 * slices) in address order and checks it against the stamp (which never
 * changes once stamping is done, so the check is exact; guest-verify remains
 * the check of record). It writes nothing to those pages. Its span, from the
 * first read to the last, is published in the sweep ring. The pass runs in
 * chunks of a fixed TSC quantum per tick, so its duration is the number of
 * quanta its page reads (and their faults) take, times the tick. */

/* Whether vCPU 0 owes the sweep a quantum in this tick. */
static int sweep_due(uint64_t now) {
  if (config.sweep_ms == 0 || stamp_done_tsc == 0) return 0;
  if (sweep.active || sweep.passes == 0) return 1;
  /* Every period from the previous start; at once if that pass overran it.
   * A TSC that went backwards (a restore elsewhere) restarts the schedule. */
  return now < sweep.start_tsc || now - sweep.start_tsc >= config.sweep_period_cycles;
}

static void sweep_finish(uint64_t end_tsc) {
  volatile struct vmm_guest_shared *shared = config.shared;
  const uint64_t number = sweep.passes + 1;
  volatile struct vmm_guest_sweep *slot = &shared->sweep_ring[(number - 1) % VMM_GUEST_SWEEP_RING];
  slot->start_tsc = sweep.start_tsc;
  slot->end_tsc = end_tsc;
  compiler_barrier();
  shared->sweep_passes = number;
  sweep.passes = number;
  sweep.active = 0;
  sweep.last_cycles = end_tsc > sweep.start_tsc ? end_tsc - sweep.start_tsc : 0;
  if (sweep.last_cycles > sweep.slowest_cycles) sweep.slowest_cycles = sweep.last_cycles;
  if (number == 1)
    console_printf("test-guest: sweep pass 1: %lu pages in %lu us\n", config.pages_total,
                   tsc_to_us(sweep.last_cycles));
  if (sweep.mismatches != 0)
    console_printf("test-guest: sweep pass %lu: %lu pages with a wrong stamp, the first at "
                   "gpa 0x%lx\n",
                   number, sweep.mismatches, sweep.first_mismatch_gpa);
}

/* Reads pages for one quantum, starting and finishing passes as they fall due. */
static void sweep_some(void) {
  uint64_t now = rdtsc();
  const uint64_t deadline = now + config.sweep_quantum_cycles;
  while (sweep_due(now)) {
    if (!sweep.active) {
      sweep.active = 1;
      sweep.start_tsc = now;
      sweep.range = 0;
      sweep.offset = 0;
      sweep.mismatches = 0;
    }
    for (;;) {
      const struct ram_range *range = &config.ranges[sweep.range];
      const uint64_t gpa = range->gpa + sweep.offset * PAGE_SIZE;
      const uint64_t word = *(const volatile uint64_t *)(uintptr_t)gpa;
      if (word != vmm_guest_page_stamp(gpa, config.seed) && sweep.mismatches++ == 0)
        sweep.first_mismatch_gpa = gpa;
      now = rdtsc();
      if (++sweep.offset == range->pages) {
        sweep.offset = 0;
        if (++sweep.range == config.nr_ranges) break;
      }
      if (now >= deadline) return;
    }
    sweep_finish(now);
    if (now >= deadline) return;
  }
}

static void log_sweep(void) {
  if (config.sweep_ms == 0 || sweep.passes == sweep.passes_at_log) return;
  console_printf("test-guest: sweep: %lu passes, %lu since the last line, the latest %lu us, "
                 "the slowest of those %lu us\n",
                 sweep.passes, sweep.passes - sweep.passes_at_log, tsc_to_us(sweep.last_cycles),
                 tsc_to_us(sweep.slowest_cycles));
  sweep.passes_at_log = sweep.passes;
  sweep.slowest_cycles = 0;
}

static void log_heartbeat(void) {
  if (heartbeat_count == 1)
    console_printf("test-guest: first heartbeat %lu us after entering ring 3\n",
                   tsc_to_us(config.shared->heartbeat_tsc - config.boot_tsc));
  if (heartbeat_count != 1 && heartbeat_count % config.heartbeats_per_log != 0) return;
  const struct vcpu_state *state = &vcpu_states[0];
  console_printf("test-guest: heartbeat %lu: %s, %lu/%lu pages stamped, max gap %lu us; "
                 "vcpu 0: %lu ticks, pass %lu, %lu pages dirtied\n",
                 heartbeat_count, stamp_done_tsc ? "running" : "stamping", all_pages_stamped(),
                 config.pages_total, tsc_to_us(heartbeat_max_gap), *cpu_tick_counter(0),
                 state->pass, state->pages_dirtied);
  heartbeat_max_gap = 0;
  log_sweep();
}

static void exit_if_due(void) {
  if (config.exit_after == 0 || heartbeat_count < config.exit_after || exit_requested) return;
  exit_requested = 1;
  console_printf("test-guest: exit-after %lu reached: requesting exit\n", config.exit_after);
  console_flush();
  outb(VMM_GUEST_EXIT_PORT, EXIT_CODE_DONE);
}

/* ------------------------------------------------------------------------ */

static void vcpu_start(uint64_t cpu) {
  struct vcpu_state *state = &vcpu_states[cpu];
  uint64_t first = config.pages_total * cpu / config.nr_vcpus;
  uint64_t end = config.pages_total * (cpu + 1) / config.nr_vcpus;
  state->slice_first_page = first;
  state->slice_pages = end - first;
  uint32_t lapic_id = mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24;
  if (lapic_id != cpu)
    console_printf("test-guest: vcpu %lu: LAPIC id %u differs from the CPUID initial APIC id\n",
                   cpu, lapic_id);
}

static void __attribute__((noreturn)) run(uint64_t cpu) {
  struct vcpu_state *state = &vcpu_states[cpu];
  volatile uint64_t *ticks = cpu_tick_counter(cpu);
  for (;;) {
    uint64_t seen = *ticks;
    if (cpu == 0) publish_heartbeat();
    uint64_t start_tsc = rdtsc();
    /* While vCPU 0 sweeps, the sweep's quantum comes off its budget. Of what
     * is left, console output may take up to half, the work the rest. */
    const int sweeping = cpu == 0 && sweep_due(start_tsc);
    const uint64_t budget =
        config.budget_cycles - (sweeping ? config.sweep_quantum_cycles : 0);
    console_drain(start_tsc + budget / 2);
    do_work(cpu, state, start_tsc + budget);
    /* Last, with a quantum timed from its own start: whatever the console
     * and the work took, each chunk of a pass gets the same time. */
    if (sweeping) sweep_some();
    publish_vcpu_status(cpu, state);
    if (cpu == 0) {
      update_global_status();
      log_heartbeat();
      exit_if_due();
    }
    state->iterations++;
    yield_until_tick_after(seen);
  }
}

/* A CPU the configuration does not use: no timer, so it sleeps for good. */
static void __attribute__((noreturn)) park(uint64_t cpu) {
  volatile uint64_t *ticks = cpu_tick_counter(cpu);
  for (;;) yield_until_tick_after(*ticks);
}

/* Entered from entry.S in ring 3 on every CPU, once per boot. */
void __attribute__((noreturn)) guest_main(uint64_t cpu, const struct hvm_start_info *start_info) {
  if (cpu == 0) {
    config.boot_tsc = rdtsc();
    console_init();
    configure(start_info);
    lapic_start_timer();
    determine_tsc_khz();
    console_printf("test-guest: boot: %lu vCPUs, RAM %lu MiB, seed 0x%lx, shared region %s 0x%lx\n",
                   config.nr_vcpus, config.ram_bytes >> 20, config.seed,
                   config.shared_from_vmm ? "from the VMM at" : "local at",
                   (uint64_t)(uintptr_t)config.shared);
    console_printf("test-guest: config: %lu stampable pages, tick %lu us, %lu dirty pages/tick, "
                   "TSC %lu kHz (%s)\n",
                   config.pages_total, config.tick_us, config.dirty_pages_per_tick, config.tsc_khz,
                   config.tsc_khz_source);
    if (config.sweep_ms != 0)
      console_printf("test-guest: sweep: every %lu ms once stamped, vcpu 0 reads every stampable "
                     "page for up to %lu us per tick\n",
                     config.sweep_ms, tsc_to_us(config.sweep_quantum_cycles));
    update_global_status();
    __atomic_store_n(&config_ready, 1, __ATOMIC_RELEASE);
  } else {
    while (!__atomic_load_n(&config_ready, __ATOMIC_ACQUIRE)) cpu_relax();
    if (cpu >= config.nr_vcpus) park(cpu);
    lapic_start_timer();
  }
  vcpu_start(cpu);
  run(cpu);
}

/* ------------------------------------------------------------------------ */

static const char *exception_name(uint64_t vector) {
  static const char *const names[] = {"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
                                      "#DF", "",    "#TS", "#NP", "#SS", "#GP", "#PF", "",
                                      "#MF", "#AC", "#MC", "#XM", "#VE", "#CP"};
  if (vector < sizeof(names) / sizeof(names[0])) return names[vector];
  return vector >= 32 ? "unexpected interrupt" : "";
}

/* Called in ring 0 by entry.S for any exception or unexpected vector.
 * frame: vector, error code, rip, cs, rflags, rsp, ss. */
void __attribute__((noreturn)) guest_fault_report(const uint64_t *frame, uint64_t cr2) {
  uint64_t cpu = ((uint64_t)(uintptr_t)frame - (uint64_t)(uintptr_t)ring0_stacks) >>
                 RING0_STACK_SHIFT;
  console_fault_printf(
      "test-guest: vcpu %lu: fault: vector %lu %s, error 0x%lx, rip 0x%lx, cs 0x%lx, "
      "rflags 0x%lx, rsp 0x%lx, cr2 0x%lx\n",
      cpu, frame[0], exception_name(frame[0]), frame[1], frame[2], frame[3], frame[4], frame[5],
      cr2);
  outb(VMM_GUEST_EXIT_PORT, EXIT_CODE_FAULT);
  for (;;) __asm__ volatile("cli; hlt");
}
