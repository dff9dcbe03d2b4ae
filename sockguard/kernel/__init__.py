"""Kernel adapters: what the node's kernel says, turned into the core's data.

libbpf and the BPF object loader, sockhash maps, network namespaces, sock_diag,
the entry sources (sockmap iterator, tc lookup), iter/tcp, kallsyms, capability
probes, the node audit that composes them, and remediation. Imports ``core`` only.
"""
