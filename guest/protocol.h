/* The shared-region protocol between the VMM and the embedded test guest.
 *
 * The shared region is a memfd-backed memslot at VMM_GUEST_SHARED_GPA, listed
 * in the PVH memory map as reserved. The VMM fills the "config" part before
 * the first vCPU runs. Without it (e.g. under QEMU) the guest keeps the same
 * structure in its own .bss and runs with one vCPU and a seed from the TSC;
 * it then fills in the config part itself, magic last, so that a tool reading
 * guest RAM finds the structure at an 8-byte aligned VMM_GUEST_MAGIC followed
 * by this version and shared_size == sizeof(struct vmm_guest_shared).
 *
 * Ordering: x86 is TSO; each writer fills the data and then bumps the
 * sequence number that publishes it (heartbeat, verify_seq, sweep_passes).
 *
 * Fields are only ever appended (the sweep fields after vcpu[]), so the
 * version stays 1: a reader of the older, shorter layout is unaffected, and
 * an older guest leaves the appended fields 0 ("no sweep").
 *
 * This header is C (the guest is freestanding C) and C++ (the VMM). */
#ifndef VMM_GUEST_PROTOCOL_H
#define VMM_GUEST_PROTOCOL_H

#include <stdint.h>

#define VMM_GUEST_SHARED_GPA 0xD0000000ULL
#define VMM_GUEST_MAGIC 0x31534d4d56545354ULL /* "TSTVMMS1" */
#define VMM_GUEST_PROTOCOL_VERSION 1u
#define VMM_GUEST_MAX_VCPUS 32u
#define VMM_GUEST_HEARTBEAT_RING 256u
#define VMM_GUEST_SWEEP_RING 64u
/* isa-debug-exit compatible: the guest writes a byte here to shut down. */
#define VMM_GUEST_EXIT_PORT 0xf4u

enum vmm_guest_phase {
  VMM_GUEST_PHASE_BOOTING = 0,  /* not yet in ring 3 */
  VMM_GUEST_PHASE_STAMPING = 1, /* heartbeat running, stamping RAM */
  VMM_GUEST_PHASE_RUNNING = 2,  /* every page stamped; dirtying */
};

/* Per-vCPU status, written only by that vCPU. 128 bytes. */
struct vmm_guest_vcpu {
  uint64_t online;        /* 1 once the vCPU runs its ring-3 loop */
  uint64_t ticks;         /* timer ticks this vCPU has handled */
  uint64_t slice_first_page; /* its slice: pages [first, first+count) of stampable RAM */
  uint64_t slice_pages;
  uint64_t pages_stamped; /* of its slice */
  uint64_t pass;          /* dirtying passes over its slice started */
  uint64_t pages_dirtied; /* total page writes by the dirtying loop */
  uint64_t verify_seq;    /* last verify request completed (publishes the next 3) */
  uint64_t verify_pages_checked;
  uint64_t verify_mismatches;
  uint64_t verify_first_mismatch_gpa; /* ~0 when none */
  uint64_t reserved[5];
};

/* One completed RAM sweep pass (sweep_ring). Defined out here, not inside
 * vmm_guest_shared, so that C and C++ give it the same (global) name. */
struct vmm_guest_sweep {
  uint64_t start_tsc; /* when the pass read its first page */
  uint64_t end_tsc;   /* after it read its last page */
};

struct vmm_guest_shared {
  /* Config: written by the VMM before boot; read-only for the guest. */
  uint64_t magic;
  uint32_t version;
  uint32_t nr_vcpus;
  uint64_t seed;
  uint64_t tsc_khz;
  uint64_t shared_size;
  uint64_t config_reserved[3];

  /* Requests: written by the VMM at any time. */
  uint64_t verify_request; /* bump: every vCPU verifies its slice, then sets verify_seq */
  uint64_t request_reserved[7];

  /* Status: written by vCPU 0. */
  uint64_t phase;          /* enum vmm_guest_phase */
  uint64_t heartbeat;      /* count of heartbeats; publishes heartbeat_tsc and the ring */
  uint64_t heartbeat_tsc;  /* TSC at the latest heartbeat */
  uint64_t boot_tsc;       /* TSC when vCPU 0 reached ring 3 */
  uint64_t pages_total;    /* stampable RAM pages (all RAM outside the guest image) */
  uint64_t stamp_done_tsc; /* TSC when the last vCPU finished stamping; 0 before */
  uint64_t status_reserved[2];
  uint64_t heartbeat_ring_tsc[VMM_GUEST_HEARTBEAT_RING]; /* TSC of heartbeat n at [n % RING] */

  struct vmm_guest_vcpu vcpu[VMM_GUEST_MAX_VCPUS];

  /* RAM sweep (guest option sweep-ms=N): vCPU 0 reads word 0 of every
   * stampable page, one pass every N ms, and records each pass's TSC span.
   * Written by vCPU 0. */
  uint64_t sweep_ms;     /* the guest's sweep period (0: no sweep) */
  uint64_t sweep_passes; /* completed passes; bumping it publishes the ring entry */
  uint64_t sweep_reserved[6];
  /* Pass n (from 1) at [(n - 1) % RING]. The slot of pass sweep_passes + 1
   * (that of pass sweep_passes + 1 - RING) may be mid-rewrite. */
  struct vmm_guest_sweep sweep_ring[VMM_GUEST_SWEEP_RING];
};

#ifdef __cplusplus
static_assert(sizeof(struct vmm_guest_vcpu) == 128, "vmm_guest_vcpu layout");
static_assert(sizeof(struct vmm_guest_sweep) == 16, "vmm_guest_sweep layout");
static_assert(sizeof(struct vmm_guest_shared) == 192 + 8 * 256 + 128 * 32 + 64 + 16 * 64,
              "shared layout");
#else
_Static_assert(sizeof(struct vmm_guest_vcpu) == 128, "vmm_guest_vcpu layout");
_Static_assert(sizeof(struct vmm_guest_sweep) == 16, "vmm_guest_sweep layout");
_Static_assert(sizeof(struct vmm_guest_shared) == 192 + 8 * 256 + 128 * 32 + 64 + 16 * 64,
               "shared layout");
#endif

/* Page stamp: word 0 of every stampable page. Never changes after stamping. */
static inline uint64_t vmm_guest_mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}
static inline uint64_t vmm_guest_page_stamp(uint64_t gpa, uint64_t seed) {
  return vmm_guest_mix(gpa ^ seed);
}
/* Dirty word: word 1 of a page, rewritten by each dirtying pass (0 before the first). */
static inline uint64_t vmm_guest_dirty_word(uint64_t gpa, uint64_t seed, uint64_t pass) {
  return vmm_guest_mix(gpa ^ seed ^ (pass * 0x9e3779b97f4a7c15ULL)) | 1;
}

#endif
