"""Beyond one Mac: pipeline and tensor / expert parallel inference on MLX's distributed engine.

Every rank is started by `mlx.launch` with the same command (`--parallel pipeline|tensor|
auto`) and runs the same generation loop on the same logits; rank 0 alone reads input and
prints, and shares what only it has. The pieces:

- world.py: joining the ranks (with a deadline), rank 0's values shared, how a rank ends;
- liveness.py: heartbeats and exit notices, so that a rank that dies or cannot be reached
  ends every rank with one line instead of a hang;
- plan.py: where each part of the model lives (layer ranges sized by memory; shares of
  heads, experts, hidden units and vocabulary);
- checkpoint.py, loading.py: each rank reads only its own tensors, and only the rows or
  columns of them it holds;
- pipeline.py, tensor.py: the model's interface over a pipeline stage, and the sharded
  modules a tensor split swaps in; comm.py: the collectives they use, with a byte count;
- costs.py: bytes per token and a tok/s model for clusters we cannot run here.
"""

from .comm import TRAFFIC
from .loading import Loaded, load_part
from .plan import KINDS, Plan, PlanError
from .world import DistributedError, World, current, is_peer_error, launched, start

__all__ = [
    "KINDS",
    "TRAFFIC",
    "DistributedError",
    "Loaded",
    "Plan",
    "PlanError",
    "World",
    "current",
    "is_peer_error",
    "launched",
    "load_part",
    "start",
]
