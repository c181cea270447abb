"""Architecture adapters (see adapter.py)."""
from dynaexq.arch.adapter import ARCHS, Arch, get_arch

__all__ = ["ARCHS", "Arch", "get_arch"]
