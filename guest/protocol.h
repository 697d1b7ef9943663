/* The shared-region protocol between the VMM and the embedded test guest.
 *
 * The shared region is a memfd-backed memslot at VMM_GUEST_SHARED_GPA, listed
 * in the PVH memory map as reserved. The VMM fills the "config" part before
 * the first vCPU runs. Without it (e.g. under QEMU) the guest keeps the same
 * structure in its own .bss and runs with one vCPU and a seed from the TSC.
 *
 * Ordering: x86 is TSO; each writer fills the data and then bumps the
 * sequence number that publishes it (heartbeat, verify_seq).
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
};

#ifdef __cplusplus
static_assert(sizeof(struct vmm_guest_vcpu) == 128, "vmm_guest_vcpu layout");
static_assert(sizeof(struct vmm_guest_shared) == 192 + 8 * 256 + 128 * 32, "shared layout");
#else
_Static_assert(sizeof(struct vmm_guest_vcpu) == 128, "vmm_guest_vcpu layout");
_Static_assert(sizeof(struct vmm_guest_shared) == 192 + 8 * 256 + 128 * 32, "shared layout");
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
