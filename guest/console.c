/* The serial console (16550 at 0x3f8), buffered.
 *
 * Every port access costs a trip through ring 0 (entry.S) and a VM exit: over
 * 100 us here, so a line written synchronously would stall a vCPU for tens of
 * milliseconds. Lines are therefore queued in a ring buffer in guest RAM, and
 * the vCPUs drain it a few bytes at a time within their per-tick budget. */
#include "console.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "arch.h"

#define COM1 0x3f8
#define UART_IER 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_LSR 5
#define UART_FCR_ENABLE_AND_CLEAR 0x07
#define UART_LSR_THR_EMPTY 0x20
/* Bytes a 16550A takes after reporting an empty transmitter. A UART model
 * without a FIFO transmits each byte at once, so this is safe there too. */
#define UART_FIFO_SIZE 16

#define LINE_MAX 192
#define BUFFER_SIZE 16384 /* a power of two */

/* Producers serialize on buffer_lock; one drainer at a time holds drain_lock.
 * head and tail only grow; the queued bytes are [tail, head). */
static char buffer[BUFFER_SIZE];
static volatile uint64_t buffer_head;
static volatile uint64_t buffer_tail;
static volatile uint32_t buffer_lock;
static volatile uint32_t drain_lock;
static uint64_t lines_dropped;

static void lock(volatile uint32_t *word) {
  while (__atomic_exchange_n(word, 1, __ATOMIC_ACQUIRE) != 0) cpu_relax();
}

static int try_lock(volatile uint32_t *word) {
  return __atomic_exchange_n(word, 1, __ATOMIC_ACQUIRE) == 0;
}

static void unlock(volatile uint32_t *word) {
  __atomic_store_n(word, 0, __ATOMIC_RELEASE);
}

void console_init(void) {
  outb(COM1 + UART_IER, 0); /* polled: no UART interrupts */
  outb(COM1 + UART_LCR, 0x03); /* 8N1 */
  outb(COM1 + UART_FCR, UART_FCR_ENABLE_AND_CLEAR);
}

/* ------------------------------------------------------------------------ */
/* Formatting. */

struct line {
  char text[LINE_MAX];
  size_t length;
};

static void line_putc(struct line *line, char c) {
  if (line->length < LINE_MAX - 1) line->text[line->length++] = c;
}

static void line_put_unsigned(struct line *line, uint64_t value, unsigned base, int width,
                              char pad) {
  char digits[24];
  int count = 0;
  do {
    unsigned digit = (unsigned)(value % base);
    digits[count++] = (char)(digit < 10 ? '0' + digit : 'a' + digit - 10);
    value /= base;
  } while (value != 0);
  for (int i = count; i < width; i++) line_putc(line, pad);
  while (count > 0) line_putc(line, digits[--count]);
}

static void line_vformat(struct line *line, const char *format, va_list args) {
  for (const char *p = format; *p != '\0'; p++) {
    if (*p != '%') {
      if (*p == '\n') line_putc(line, '\r');
      line_putc(line, *p);
      continue;
    }
    p++;
    char pad = ' ';
    int width = 0;
    int longs = 0;
    if (*p == '0') {
      pad = '0';
      p++;
    }
    while (*p >= '0' && *p <= '9') width = width * 10 + (*p++ - '0');
    while (*p == 'l') {
      longs++;
      p++;
    }
    switch (*p) {
      case 'd': {
        int64_t value = longs ? va_arg(args, int64_t) : va_arg(args, int);
        if (value < 0) {
          line_putc(line, '-');
          line_put_unsigned(line, (uint64_t)0 - (uint64_t)value, 10, width, pad);
        } else {
          line_put_unsigned(line, (uint64_t)value, 10, width, pad);
        }
        break;
      }
      case 'u':
      case 'x': {
        uint64_t value = longs ? va_arg(args, uint64_t) : va_arg(args, unsigned);
        line_put_unsigned(line, value, *p == 'u' ? 10 : 16, width, pad);
        break;
      }
      case 's': {
        const char *text = va_arg(args, const char *);
        while (*text != '\0') line_putc(line, *text++);
        break;
      }
      case 'c':
        line_putc(line, (char)va_arg(args, int));
        break;
      case '%':
        line_putc(line, '%');
        break;
      default:
        return;
    }
  }
}

/* ------------------------------------------------------------------------ */
/* Queueing and draining. */

static uint64_t buffer_free(void) {
  return BUFFER_SIZE - (buffer_head - __atomic_load_n(&buffer_tail, __ATOMIC_ACQUIRE));
}

static void buffer_append(const char *text, size_t length) {
  uint64_t head = buffer_head;
  for (size_t i = 0; i < length; i++) buffer[(head + i) & (BUFFER_SIZE - 1)] = text[i];
  __atomic_store_n(&buffer_head, head + length, __ATOMIC_RELEASE);
}

static void queue_line(const struct line *line) {
  lock(&buffer_lock);
  if (lines_dropped != 0) {
    struct line note;
    note.length = 0;
    const char *prefix = "test-guest: console buffer full, lines dropped: ";
    while (*prefix != '\0') line_putc(&note, *prefix++);
    line_put_unsigned(&note, lines_dropped, 10, 0, ' ');
    line_putc(&note, '\r');
    line_putc(&note, '\n');
    if (buffer_free() >= note.length + line->length) {
      buffer_append(note.text, note.length);
      lines_dropped = 0;
    }
  }
  if (lines_dropped == 0 && buffer_free() >= line->length)
    buffer_append(line->text, line->length);
  else
    lines_dropped++;
  unlock(&buffer_lock);
}

void console_printf(const char *format, ...) {
  struct line line;
  line.length = 0;
  va_list args;
  va_start(args, format);
  line_vformat(&line, format, args);
  va_end(args);
  queue_line(&line);
}

/* Writes up to one FIFO's worth of queued bytes, stopping at the deadline
 * (but always making progress). Returns whether bytes remain queued. The
 * caller holds drain_lock. */
static int drain_fifo(uint64_t deadline_tsc) {
  uint64_t tail = buffer_tail;
  uint64_t head = __atomic_load_n(&buffer_head, __ATOMIC_ACQUIRE);
  if (tail == head) return 0;
  if (!(inb(COM1 + UART_LSR) & UART_LSR_THR_EMPTY)) return 1;
  for (int sent = 0; sent < UART_FIFO_SIZE && tail != head; sent++) {
    if (sent > 0 && (int64_t)(rdtsc() - deadline_tsc) >= 0) break;
    outb(COM1, (uint8_t)buffer[tail & (BUFFER_SIZE - 1)]);
    tail++;
  }
  __atomic_store_n(&buffer_tail, tail, __ATOMIC_RELEASE);
  return tail != head;
}

void console_drain(uint64_t deadline_tsc) {
  if (buffer_tail == buffer_head || !try_lock(&drain_lock)) return;
  while (drain_fifo(deadline_tsc) && (int64_t)(rdtsc() - deadline_tsc) < 0) {
  }
  unlock(&drain_lock);
}

void console_flush(void) {
  lock(&drain_lock);
  while (drain_fifo(UINT64_MAX)) {
  }
  unlock(&drain_lock);
}

/* Ring 0 only: waits (boundedly) for the transmitter before each FIFO's worth. */
static void write_now(const char *text, size_t length) {
  for (size_t i = 0; i < length; i++) {
    if (i % UART_FIFO_SIZE == 0)
      for (int polls = 0; polls < 1000 && !(inb(COM1 + UART_LSR) & UART_LSR_THR_EMPTY); polls++)
        cpu_relax();
    outb(COM1, (uint8_t)text[i]);
  }
}

void console_fault_printf(const char *format, ...) {
  struct line line;
  line.length = 0;
  va_list args;
  va_start(args, format);
  line_vformat(&line, format, args);
  va_end(args);
  /* The drainer may be this very CPU, interrupted (or faulting) mid-drain:
   * wait a little, then go ahead without the lock. */
  int locked = 0;
  for (int tries = 0; tries < 10000 && !locked; tries++) {
    locked = try_lock(&drain_lock);
    if (!locked) cpu_relax();
  }
  uint64_t head = __atomic_load_n(&buffer_head, __ATOMIC_ACQUIRE);
  for (uint64_t tail = buffer_tail; tail != head;) {
    uint64_t offset = tail & (BUFFER_SIZE - 1);
    uint64_t chunk = head - tail < BUFFER_SIZE - offset ? head - tail : BUFFER_SIZE - offset;
    write_now(&buffer[offset], chunk);
    tail += chunk;
  }
  buffer_tail = head;
  write_now(line.text, line.length);
  if (locked) unlock(&drain_lock);
}
