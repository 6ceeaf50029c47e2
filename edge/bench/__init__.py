"""Benchmarks (``edge bench ...``) and what they share: a local Mosquitto, CPU and RSS
readers. Out of the product path: nothing under ``edge`` but the CLI imports it.

May import anything in ``edge``.
"""
