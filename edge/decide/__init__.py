"""Decisions: the policy document, zones and lines, the tracker, the decision engine
(outcomes, rules, debounce, cooldowns), the alert publisher and on-device snapshots.

May import ``edge.core``, ``edge.config``, ``edge.inference``, ``edge.schedule`` and
``edge.sync``; never ``edge.updates``.
"""
