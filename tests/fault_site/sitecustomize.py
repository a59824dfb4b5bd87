"""Fault injection from outside the code under test: on PYTHONPATH of a spawned run only.

With AUTOMODEL_FAULT_KILL_PUBLISHING=<name> set, the process SIGKILLs itself when it is about to rename a folder
called <name> (e.g. `.step_6.partial`, the moment a checkpoint save has written everything but is not yet
published). It wraps `os.replace`, which the checkpoint code calls at publish time; nothing in automodel knows.
"""

import os
import signal

_target = os.environ.get("AUTOMODEL_FAULT_KILL_PUBLISHING")
if _target:
    _replace = os.replace

    def _replace_or_die(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(src)) == _target:
            os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _replace_or_die
