"""Speaking the line controllers' languages: a Sparkplug B edge node, Home Assistant
MQTT discovery, and commands back from the line.

Owns the second view of the device that SCADA and home-automation software read
without custom code (``sparkplug``: births, data by exception, death certificates,
rebirth; ``homeassistant``: discovery and each camera's summary), the commands a line
controller sends to steer a camera's rules (``commands``: validated, applied through the
decide engine between two frames, audited in the outbox), the typed view both exports
are made from (``view``), and the one MQTT connection and thread that carries all of it
(``service``). Alerts keep going out on edgecam's own topics (``edge.decide.alerts``);
this stage only adds views of them.

It sits after ``edge.decide`` in the data flow: it may import ``edge.core``,
``edge.config``, ``edge.schedule`` (the cameras' counters), ``edge.sync`` (its audit
events), ``edge.observe`` (the observe snapshot) and ``edge.decide`` (the engine's rule
states and controls), never ``edge.updates`` or the daemon. The decide engine never
imports it; the daemon wires the two together.
"""
