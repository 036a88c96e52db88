"""The complete Linux KSM (see the README's layout). ``jitcache`` first: the compiled scan's cache
is stamped with all the emulator's sources, before any module here defines a cached function."""

from vmhost.ksm import jitcache  # noqa: F401
