/* x86 helpers for the test guest, usable in ring 3 (every page, MMIO
 * included, is mapped user-accessible) and in ring 0. */
#ifndef GUEST_ARCH_H
#define GUEST_ARCH_H

#include <stdint.h>

#include "layout.h"

static inline unsigned current_privilege_level(void) {
  uint16_t cs;
  __asm__("mov %%cs, %0" : "=r"(cs));
  return cs & 3;
}

/* Ring 3 does port I/O through a `ud2` service call to ring 0 (entry.S: IOPL 3
 * does not work under PVM); ring 0 (the fault path) does it directly. */
static inline void outb(uint16_t port, uint8_t value) {
  if (current_privilege_level() == 0)
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
  else
    __asm__ volatile("ud2"
                     :
                     : "a"(value), "d"(port), "c"(SERVICE_PORT_OUT)
                     : "memory");
}

static inline uint8_t inb(uint16_t port) {
  uint8_t value;
  if (current_privilege_level() == 0)
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
  else
    __asm__ volatile("ud2"
                     : "=a"(value)
                     : "d"(port), "c"(SERVICE_PORT_IN)
                     : "memory");
  return value;
}

static inline uint64_t rdtsc(void) {
  uint32_t lo, hi;
  __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
  return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void) {
  __asm__ volatile("pause" : : : "memory");
}

static inline void compiler_barrier(void) {
  __asm__ volatile("" : : : "memory");
}

static inline uint32_t mmio_read32(uint64_t address) {
  return *(volatile uint32_t *)address;
}

static inline void mmio_write32(uint64_t address, uint32_t value) {
  *(volatile uint32_t *)address = value;
}

#endif
