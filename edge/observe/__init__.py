"""Watching the pipeline: metrics, result drift and image quality, per camera.

Owns what the device measures about itself beyond its counters: the histograms of
capture-to-result age and stage latency (``histogram``), the quality and tamper
measures of the picture (``quality``), result drift against a baseline (``drift``,
``baseline``), the sink and frame hook that feed them on the executor threads
(``observer``), and the Prometheus exposition of all of it with what the other stages
already count (``metrics``).

It sits after ``edge.sync`` in the data flow and before ``edge.decide``: it may import
``edge.core``, ``edge.config``, ``edge.capture``, ``edge.inference``, ``edge.schedule``
and ``edge.sync`` (to make its ``drift`` events), never ``edge.decide`` or anything
later. The decide engine reads its snapshot and raises the alerts; the daemon hands the
metrics collector the other stages' stats as plain callables.
"""
