"""Chaos runs: faults injected into real processes, a Jepsen-style checker over every answer.

``python -m ndpipe.chaos SCENARIO [--tasks N] [--seed S]`` runs one scenario and prints the
checker's table; ``--all`` runs them all. docs/RELIABILITY.md records what each injects and the
counts and recovery times measured.
"""
