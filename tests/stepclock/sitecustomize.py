"""For tests: this process's wall clock, stepped by the offset (seconds) written in the file
named by $EDGECAM_STEP_CLOCK. The monotonic clock is left alone, as a real step leaves it.

Put this directory on PYTHONPATH of a daemon the test starts; Python imports it first."""

import os
import time

_path = os.environ.get("EDGECAM_STEP_CLOCK")
if _path:
    _real, _real_ns, _mono = time.time, time.time_ns, time.monotonic
    _state = {"offset": 0.0, "read_at": -1.0}

    def _offset() -> float:
        now = _mono()
        if now - _state["read_at"] > 0.05:
            _state["read_at"] = now
            try:
                with open(_path) as f:
                    _state["offset"] = float(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
        return _state["offset"]

    time.time = lambda: _real() + _offset()
    time.time_ns = lambda: _real_ns() + int(_offset() * 1e9)
