/* The freestanding compiler may still emit calls to these (struct copies and
 * initializers). Built with -fno-tree-loop-distribute-patterns so the loops
 * below are not turned back into calls to themselves. */
#include <stddef.h>

void *memset(void *destination, int value, size_t size) {
  unsigned char *bytes = destination;
  for (size_t i = 0; i < size; i++) bytes[i] = (unsigned char)value;
  return destination;
}

void *memcpy(void *destination, const void *source, size_t size) {
  unsigned char *to = destination;
  const unsigned char *from = source;
  for (size_t i = 0; i < size; i++) to[i] = from[i];
  return destination;
}

void *memmove(void *destination, const void *source, size_t size) {
  unsigned char *to = destination;
  const unsigned char *from = source;
  if (to < from) {
    for (size_t i = 0; i < size; i++) to[i] = from[i];
  } else {
    for (size_t i = size; i > 0; i--) to[i - 1] = from[i - 1];
  }
  return destination;
}

int memcmp(const void *a, const void *b, size_t size) {
  const unsigned char *left = a;
  const unsigned char *right = b;
  for (size_t i = 0; i < size; i++)
    if (left[i] != right[i]) return left[i] < right[i] ? -1 : 1;
  return 0;
}
