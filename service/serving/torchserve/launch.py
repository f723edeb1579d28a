"""``python -m service.serving.torchserve.launch <torchserve arguments>``: TorchServe's own
launcher that ends as its Java frontend ended.

This runs what the ``torchserve`` command runs (``ts.model_server.start``). In
``--foreground`` that launcher waits for the frontend and then exits 0, whatever happened
to it: the frontend's exit code, or the signal that killed it, is lost, and the frontend is
not our child (its parent, the launcher, reaps it). Run this way, the launcher writes one
line about how the frontend ended to its output (``torchserve.log``) and ends the same way:
with the frontend's exit code (3 after ``-XX:+ExitOnOutOfMemoryError``), or killed by the
same signal. :class:`~service.serving.torchserve.process.TorchServeProcess` reads it as the
return code of the process it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

from service.serving.torchserve.liveness import describe_exit


def main(argv: list[str] | None = None) -> int:
    from ts import model_server

    started: list[subprocess.Popen] = []

    class _Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    # Only the launcher's own name for the module changes: subprocess itself is untouched.
    model_server.subprocess = SimpleNamespace(Popen=_Recorded)
    sys.argv = ["torchserve", *(sys.argv[1:] if argv is None else argv)]
    model_server.start()  # returns when the frontend has ended (--foreground)
    if not started:
        return 0  # nothing was started (--version, --stop, ...)
    frontend = started[-1]
    code = frontend.wait()
    print(f"===== modelctl: TorchServe's frontend (pid {frontend.pid}) ended: {describe_exit(code)}",
          flush=True)
    if code < 0:  # end as it ended: killed by the same signal
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL and SIGSTOP have no handler to reset
            pass
        os.kill(os.getpid(), -code)
        return 128 - code  # a signal whose default is not to end a process
    return code


if __name__ == "__main__":
    sys.exit(main())
