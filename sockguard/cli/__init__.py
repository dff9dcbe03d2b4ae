"""The command line: argument parsing and commands, human and JSON output, ``doctor``.
The top layer: may import every other.
"""
