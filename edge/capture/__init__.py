"""Capture: camera and file sources, one capture thread per camera (newest frame wins;
stale, frozen and failed feeds reopened with backoff) and the motion gate.

May import ``edge.core`` and ``edge.config``.
"""
