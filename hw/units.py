"""Page and memory-size units of the emulated x86-64 host, defined once for every layer.

The kernel's PAGE_SIZE (4 KiB base pages) and its PMD-sized transparent huge page, under names
that say what they count: ``HPAGE_PAGES`` is a number of base pages (the kernel's
``HPAGE_PMD_NR``), ``HPAGE_SIZE`` a number of bytes (``HPAGE_PMD_SIZE``). This module is in
``hw`` because the page size is the hardware's and ``hw`` is the layer everything else may
import.
"""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT                  # bytes in a base page
HPAGE_ORDER = 9
HPAGE_PAGES = 1 << HPAGE_ORDER               # base pages in a 2 MiB huge page (HPAGE_PMD_NR)
HPAGE_SIZE = HPAGE_PAGES * PAGE_SIZE         # bytes in a 2 MiB huge page (HPAGE_PMD_SIZE)
MIB = 1 << 20
GIB = 1 << 30
PAGES_PER_MIB = MIB // PAGE_SIZE
PAGES_PER_GIB = GIB // PAGE_SIZE
