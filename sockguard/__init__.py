"""sockguard: keeps eBPF socket-redirect maps (sockhash) honest."""

__version__ = "0.1.0"
