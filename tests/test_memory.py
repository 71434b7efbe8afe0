"""`import ltu_jax` makes freed XLA buffers reusable: a repeated call faults in no fresh memory."""

import subprocess
import sys
import textwrap

import pytest

from ltu_jax import memory

# Each call returns a fresh 128 MiB array (32,768 pages of 4 KiB), dropped before the next call.
CALLS = textwrap.dedent(
  """
  import resource, sys
  if sys.argv[1] == "ltu_jax":
    import ltu_jax
  import jax, jax.numpy as jnp
  make = jax.jit(lambda x: jnp.broadcast_to(x, (2**25,)) + 1.0)
  for _ in range(3):
    make(jnp.float32(1)).block_until_ready()
  faults = []
  for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    make(jnp.float32(1)).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  print(min(faults))
  """
)


def page_faults(imports: str) -> int:
  """The fewest page faults of five repeated calls: a call may still miss the freed block when the runtime
  frees the previous output on another thread only after the next call has allocated (seen on a loaded
  machine), but without the set-up no call reuses it."""
  done = subprocess.run([sys.executable, "-c", CALLS, imports], check=True, capture_output=True, text=True)
  return int(done.stdout.split()[-1])


@pytest.mark.skipif(not memory.reuse_freed_memory(), reason="needs glibc")
def test_repeated_call_reuses_freed_memory():
  # Without the set-up every call maps its 128 MiB afresh; with it the freed block is reused.
  assert page_faults("jax") > 30_000
  assert page_faults("ltu_jax") < 3_000
