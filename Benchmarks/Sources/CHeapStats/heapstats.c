#define _GNU_SOURCE
#include <malloc.h>
#include "CHeapStats.h"

size_t gmem_heap_in_use(void) {
    struct mallinfo2 m = mallinfo2();
    return m.uordblks + m.hblkhd;
}
