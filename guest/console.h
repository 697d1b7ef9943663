/* The serial console: lines are queued in guest RAM and written to the 16550
 * at 0x3f8 by whichever vCPU drains the queue (see console.c for why). */
#ifndef GUEST_CONSOLE_H
#define GUEST_CONSOLE_H

#include <stdint.h>

void console_init(void);
/* Queues one line (printf subset: %d %u %x %s %c %%, 'l' length modifier,
 * zero-padded widths). Drops it, and later says so, if the queue is full. */
void console_printf(const char *format, ...) __attribute__((format(printf, 1, 2)));
/* Writes queued bytes until the TSC reaches the deadline; returns at once if
 * another vCPU is draining. */
void console_drain(uint64_t deadline_tsc);
/* Writes everything queued, however long it takes (before exiting). */
void console_flush(void);
/* Ring 0 (the fault path): writes what is queued, then this line, at once. */
void console_fault_printf(const char *format, ...) __attribute__((format(printf, 1, 2)));

#endif
