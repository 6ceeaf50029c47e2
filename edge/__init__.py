"""edgecam's on-device runtime.

One package per stage of the data flow, imports pointing down it (docs/architecture.md):
``core`` → ``config`` → ``capture``, ``inference`` → ``schedule`` → ``sync`` →
``observe`` → ``decide``, ``updates`` → ``daemon`` → ``bench`` → ``cli``. The fleet imports
``edge.core``, and to validate what it signs the manifest and model loader of
``edge.inference`` and the policy parser of ``edge.decide``; ``edge`` never imports ``fleet``.
"""

__version__ = "0.1.0"
