/* Xen PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h), the subset
 * the test guest uses. Usable from C and C++. */
#ifndef GUEST_PVH_H
#define GUEST_PVH_H

#include <stdint.h>

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define HVM_START_MAGIC 0x336ec578u
#define HVM_MEMMAP_TYPE_RAM 1u

struct hvm_start_info {
  uint32_t magic; /* HVM_START_MAGIC */
  uint32_t version; /* memmap fields valid from version 1 */
  uint32_t flags;
  uint32_t nr_modules;
  uint64_t modlist_paddr;
  uint64_t cmdline_paddr; /* NUL-terminated, 0 if none */
  uint64_t rsdp_paddr;
  uint64_t memmap_paddr;
  uint32_t memmap_entries;
  uint32_t reserved;
};

struct hvm_memmap_table_entry {
  uint64_t addr;
  uint64_t size;
  uint32_t type;
  uint32_t reserved;
};

#endif
