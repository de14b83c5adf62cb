"""Exceptions shared by the C++ core and its Python twin (the extension raises these same classes)."""


class OutOfBlocks(RuntimeError):
    """The KV block pool cannot satisfy an allocation, even after evicting unreferenced cached blocks.

    Raised before any state changes, so the caller may free or preempt something and retry.
    """
