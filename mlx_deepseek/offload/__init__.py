"""Bigger than memory: routed experts streamed from the checkpoint under a memory budget.

- budget.py: --expert-cache SIZE -> slots per MoE layer (and the minimum that works);
- locate.py: each expert's byte ranges in the safetensors files (headers only);
- reader.py: positioned reads into slot memory from a pool of threads;
- experts.py: StreamedExperts, a MoE layer's bank of slots (LRU, prefetch, statistics);
- install.py: the banks put into a loaded model, the per-model ExpertStore.

The latent KV cache's quantization (the other half of fitting in memory) lives with the
cache, in models/cache.py.
"""

from .budget import HEADROOM, Budget, ExpertShape, gb, parse_budget, slots_for
from .experts import ExpertCacheStats, StreamedExperts
from .install import (
    ExpertStore,
    StreamingPlan,
    expert_store,
    install,
    plan_streaming,
    routed_shape,
)
from .locate import NotStreamable

__all__ = [
    "HEADROOM",
    "Budget",
    "ExpertCacheStats",
    "ExpertShape",
    "ExpertStore",
    "NotStreamable",
    "StreamedExperts",
    "StreamingPlan",
    "expert_store",
    "install",
    "parse_budget",
    "gb",
    "plan_streaming",
    "routed_shape",
    "slots_for",
]
