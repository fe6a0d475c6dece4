"""Put on a child's PYTHONPATH by tests/stopping.py: the conversion stops itself (SIGSTOP)
right after its first shard write, so the test signals it mid-write on any machine."""

import os
import signal

from mlx_deepseek.convert.writer import ShardWriter

_write = ShardWriter.write
_stopped = []


def _write_then_stop(self, *args, **kwargs):
    _write(self, *args, **kwargs)
    if not _stopped:
        _stopped.append(True)
        os.kill(os.getpid(), signal.SIGSTOP)


ShardWriter.write = _write_then_stop
