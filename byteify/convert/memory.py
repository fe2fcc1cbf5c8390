"""Process memory: hand freed heap back to the OS, so that a streaming conversion's resident
size stays at what it holds now, not at the most it ever held (glibc keeps freed memory)."""

from __future__ import annotations


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def return_large_frees_to_os(threshold: int = 1 << 20) -> None:
    """Serve every allocation above ``threshold`` bytes with its own mapping, so that freeing it
    gives the memory back at once.  glibc otherwise raises that threshold as large blocks are
    freed and serves the next ones from a heap it rarely shrinks: a streaming conversion's
    one-tensor-at-a-time reads would pile up there.  Process-wide, so the CLI calls it (its
    process is one conversion), not :func:`convert`."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (fixing it also turns off the dynamic raise)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and a conversion's
    resident size would carry the fresh-part init into the layer streaming)."""
    import gc

    gc.collect()  # transformers models hold reference cycles: free their tensors now
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
