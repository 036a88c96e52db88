"""Reality checks: the code that needs the real machine (root, the running kernel's KSM, memory
blocks that can be offlined, QEMU).

Nothing in the emulator (``hw``, ``guests``, ``vmhost.mm``, ``vmhost.ksm``, the studies) imports
this package; it imports the emulator to hold it against the kernel.

- ``ksm_oracle``: run a KSM trace on this machine's kernel (exclusive use of /sys/kernel/mm/ksm,
  knobs restored by a parent that outlives the worker).
- ``live_ksm``: live QEMU guests merged by the real ksmd.
- ``calibrate``: ``vmhost calibrate qemu``, the emulator's prediction against real guests.
- ``lab``: the QEMU lab (a tiny Debian guest, booted under TCG, dumped through QMP).
"""
