"""The event tracer: BPF programs on the kernel's sockhash and receive paths, their ring
buffer, and the collision check at connect time. Imports ``core`` and ``kernel``.
"""
