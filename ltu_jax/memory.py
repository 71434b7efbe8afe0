"""How the process allocates memory: freed buffers are kept for the next call instead of being given back.

XLA on CPU allocates each call's temporaries (one block: 70 MB for the Whisper tiny encoder on 30 s,
730 MB for a tiny training step) with `malloc` on a worker thread and frees them when the call ends. glibc
serves any block over 64 MiB from a worker thread's arena, and any block over its mmap threshold (at most
32 MiB), with a fresh `mmap`, and `free` unmaps it: every call then faults in and zeroes all of it again
(178,000 page faults, 0.7 GB, per tiny training step). With one arena, no `mmap` and no trimming of the
heap's top, the block is carved from the heap and reused by the next call; the price is that the process
keeps its largest heap (its peak temporaries) mapped until it exits.

`import ltu_jax` applies it, so every command and script gets it without setting anything (glibc's
`GLIBC_TUNABLES` would have to be set before the interpreter starts). Elsewhere (not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes

# mallopt(3) parameters of glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# mallopt takes a C int: the largest trim threshold it accepts (a heap top of 2 GiB or more is trimmed).
INT_MAX = 2**31 - 1


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep and reuse freed memory (see the module's doc); returns whether it could."""
  try:
    libc = ctypes.CDLL(None)  # the C library the interpreter runs on
    libc.gnu_get_libc_version  # glibc's alone
  except (OSError, AttributeError):
    return False
  # One arena: worker threads' blocks come from the main heap, the only one that may grow past 64 MiB
  # without mmap. mallopt returns 1 on success.
  settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, INT_MAX))
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
