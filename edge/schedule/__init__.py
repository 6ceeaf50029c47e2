"""Scheduling: the per-camera planner (frame budget, priorities, cadences, triggers,
cost estimates), the EDF scheduler and its executors, and liveness (watchdog, stuck
invokes).

May import ``edge.core``, ``edge.config``, ``edge.capture`` and ``edge.inference``.
"""
