"""Fake mechanisms for the benchmark's worker-process tests (imported only by the
benchmark's worker via ``--import bench_fake_mechanisms``; never by the test
session, so the registry the generic tests see is unchanged)."""

import os
import signal

from efficient_attention import MultiheadAttention, register_attention

__all__ = []


@register_attention("bench_killed")
class KilledAttention(MultiheadAttention):
    """Exact attention whose process is killed (as by the OOM killer) from 32 tokens on."""

    def _attend(self, q, k, v, masks, need_weights):
        if q.shape[2] >= 32:
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._attend(q, k, v, masks, need_weights)
