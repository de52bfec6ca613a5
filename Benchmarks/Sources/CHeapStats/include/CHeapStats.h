#ifndef CHEAPSTATS_H
#define CHEAPSTATS_H
#include <stddef.h>
/// Bytes the C heap has handed out: mallinfo2().uordblks + hblkhd (glibc).
size_t gmem_heap_in_use(void);
#endif
