"""The audit core: plain data in, findings out, no system calls.

The data model, Cilium's key layout, each finding kind's policy, the classifier,
compact rows for scale, TCP state names, the error hierarchy and label escaping.
Imports nothing from the other layers, so every rule here is testable without root.
"""
