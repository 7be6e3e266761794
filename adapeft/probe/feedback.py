"""What the prober learns from its last probe once the numbers reach the host, without the host waiting for them:
room in the ledgers for the next probe, and a warning, once a group and cause, about the groups it could not
measure."""
import math
import warnings

import torch

from .result import UNMEASURED, VERDICT


class LastProbe:
    """The last probe's summary (per group: the elements its moves saved, the chunks left unmoved, the verdict, and
    how many times its step grew for the next probe), copied to the host behind a CUDA event (on the CPU: at
    once)."""

    def __init__(self, ledgers, step_policy):
        self.ledgers, self.step_policy = ledgers, step_policy
        self._pending = None
        self._said = set()  # (cause, group) pairs warned about

    def remember(self, saved, unmoved, verdict, growth, names):
        summary = torch.stack([saved, unmoved, verdict.double(), growth])
        if summary.device.type == "cuda":
            host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
            host.copy_(summary, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = summary, None
        self._pending = (event, host, list(names), self.ledgers.entry_words(names))

    def wait(self):
        """Wait until the summary is on the host (a host synchronisation on CUDA)."""
        if self._pending is not None and self._pending[0] is not None:
            self._pending[0].synchronize()

    def learn(self, stacklevel):
        """Grow the ledgers and warn (pointing `stacklevel` frames up from the caller), if the summary has
        landed (else nothing, and the next call tries again)."""
        if self._pending is None:
            return
        event, host, names, words = self._pending
        if event is not None and not event.query():
            return
        self._pending = None
        saved, unmoved, verdict, growth = host[0].tolist(), host[1], host[2].long().tolist(), host[3].tolist()
        # The elements a move saves grow with its step (benchmarks/bench_ledger.py: about as the step to the 0.8),
        # so room for the last probe's entries times its step's growth is enough for the next.
        self.ledgers.grow({name: math.ceil(s * g) * w for name, s, g, w in zip(names, saved, growth, words)},
                          bool(unmoved.any()))
        for cause, why in UNMEASURED.items():
            named = [name for name, code in zip(names, verdict)
                     if code == VERDICT[cause] and (cause, name) not in self._said]
            if named:
                self._said.update((cause, name) for name in named)
                if cause == "did not move":
                    why += ("; their steps grow for the next probe" if self.step_policy == "adaptive" else
                            "; use a larger eta, step_policy='adaptive', or float32 master weights")
                warnings.warn(f"adapeft.Prober: {cause}: groups {named}: {why}", UserWarning, stacklevel=stacklevel + 1)
