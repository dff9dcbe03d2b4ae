"""The always-on service: the daemon's cycle, its configuration, Prometheus metrics
and systemd/journal notification. Imports ``core``, ``kernel`` and ``trace``.
"""
