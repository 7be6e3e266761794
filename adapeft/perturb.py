"""GroupPerturbation: a parameter group moved in place along a direction and restored bit for bit."""
import _signal
import threading
import warnings

import torch

from .ops import layout as L
from . import ops

# Room for saved elements, as a share of the group. Measured by benchmarks/bench_ledger.py (1M elements,
# w ~ N(0, 0.02), d ~ N(0, 1), worst of the four steps): float32 saves 0.09% / 0.66% / 4.0% of its elements
# at relative steps r = 1e-4 / 1e-3 / 1e-2, bfloat16 0.04% / 0.37% / 2.3%, float16 0.04% / 0.27% / 2.2%.
# Weights stored exactly at zero (a fresh LoRA B) need an entry per element in bfloat16, half in float16.
DEFAULT_CAPACITY_FRACTION = 1 / 16
MIN_CAPACITY = 1024


class _SigintDeferred:
    """Keeps Ctrl-C from landing between a move and the bookkeeping that records it: an interrupt that
    arrives inside is raised on the way out. Does nothing off the main thread, under a SIGINT handler of
    the user's, or inside another one. It calls the C functions of `_signal` because `signal.signal`'s
    enum conversions took 7 of the 8 us that each move spent here."""

    __slots__ = ("active", "received")

    def __enter__(self):
        self.received = False
        self.active = threading.current_thread() is threading.main_thread() and \
            _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler
        if self.active:
            _signal.signal(_signal.SIGINT, self._record)
        return self

    def _record(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self.active:
            _signal.signal(_signal.SIGINT, _signal.default_int_handler)
            if self.received:
                raise KeyboardInterrupt
        return False


class GroupPerturbation:
    """A group of parameters and its direction, ready to be moved to `w0 - steps[j] * d` and back.

    Every move is a *rebase*: w0 is rebuilt exactly from the current values (the few elements whose step
    is not invertible are kept in a ledger) and the next point written in the same pass, so after
    `restore()` every element is bit-identical to w0 whatever the dtype. No copy of the group is made:
    the two ledgers hold `capacity` saved elements each (8 bytes apiece, 16 in float64; several groups
    probed one after the other may share one pair, `ledgers=`). If a step needs more, the
    chunks (4096 elements) that do not fit stay at w0 for that step; the report says so (`unmoved`), the
    realized step accounts for it, and `grow()` makes room for the next time.

    `steps` is a float32 device tensor of step sizes (e.g. eta * [-2, -1, 1, 2]); it may be rewritten
    while the group is at w0 (a captured CUDA graph then replays with the new values) but never while
    it is perturbed, since the next move reads the current step to rebuild w0. The same holds for
    `hyper`, the optimizer hyperparameters when `layout` forms directions from an optimizer's state
    (see adapeft.optimizer_direction).

    Use as a context manager (or try/finally) so that an exception, a NaN loss or Ctrl-C restores w0.
    """

    def __init__(self, params, directions, steps, *, states=(), layout=(), hyper=None, capacity=None, ledgers=None,
                 validate=False):
        self.params = list(params)
        self.directions = list(directions)
        self.states, self.layout = list(states), [int(v) for v in layout]
        if validate:
            self.check_directions()
        self.table = ops.pack_group(self.params, self.directions, self.states, self.layout)
        self.fingerprint = ops.group_fingerprint(self.params, self.directions, self.states, self.layout)
        self.device = self.params[0].device
        self.hyper = hyper if hyper is not None else torch.empty(0, dtype=torch.float64, device=self.device)
        if steps.device != self.device or steps.dtype != torch.float32:
            raise ValueError(f"adapeft.GroupPerturbation: steps must be a float32 tensor on {self.device}, got "
                             f"{steps.dtype} on {steps.device}")
        self.steps = steps
        self.numel = sum(p.numel() for p in self.params)
        self.num_chunks = L.count_chunks(self.params)
        self._entry_words = max(L.entry_words(p.dtype) for p in self.params)
        if ledgers is not None:
            self._ledgers = self._check_ledgers(ledgers)
        else:
            if capacity is None:
                capacity = max(MIN_CAPACITY, int(self.numel * DEFAULT_CAPACITY_FRACTION))
            self._ledgers = self._new_ledgers(capacity)
        # (current step or -1 for w0, index of the ledger that describes it), updated as one value.
        self._state = (-1, 0)

    @property
    def position(self):
        """The step the group is at, or -1 when it holds its unperturbed values."""
        return self._state[0]

    @property
    def ledgers(self):
        """The two ledgers the moves alternate between (shared with other groups where given as `ledgers=`)."""
        return list(self._ledgers)

    @property
    def state(self):
        """(the step the group is at or -1, the ledger that describes it): what the next move starts from.
        A CUDA graph capture records moves without running them; the capturer puts the state back after."""
        return self._state

    @state.setter
    def state(self, value):
        self._state = value

    @property
    def capacity(self):
        """Elements the ledgers can save per step."""
        return (self._ledgers[0].numel() - L.LEDGER_HEADER_WORDS - self.num_chunks) // self._entry_words

    def _new_ledgers(self, capacity):
        return [ops.new_ledger(self.num_chunks, capacity * self._entry_words, self.device) for _ in range(2)]

    def _check_ledgers(self, ledgers):
        ledgers = list(ledgers)
        if len(ledgers) != 2 or ledgers[0] is ledgers[1]:
            raise ValueError("adapeft.GroupPerturbation: ledgers must be two distinct tensors from adapeft.new_ledger")
        for ledger in ledgers:
            if ledger.dtype != torch.int64 or ledger.device != self.device or \
                    ledger.numel() < L.LEDGER_HEADER_WORDS + self.num_chunks or ledger.numel() != ledgers[0].numel():
                raise ValueError(f"adapeft.GroupPerturbation: ledgers must be int64 tensors of one size on {self.device}"
                                 f" with at least {L.LEDGER_HEADER_WORDS + self.num_chunks} words for this group")
        return ledgers

    def check_directions(self):
        """Raise up front if a direction holds inf or nan (costs one host synchronisation)."""
        for i, d in enumerate(self.directions):
            if d.numel() and not bool(torch.isfinite(d).all()):
                raise ValueError(f"adapeft.GroupPerturbation: directions[{i}] contains inf or nan")

    def move(self, step, report=None, report_row=-1):
        """Move the group to w0 - steps[step] * d (step -1: back to w0); optionally write a report row."""
        position, current = self._state
        if report is None:
            report, report_row = self._ledgers[current].new_empty((0,), dtype=torch.float64), -1
        with _SigintDeferred():
            ops.perturb_(self.params, self.directions, self.states, self.layout, self.table, self.fingerprint,
                         self.hyper, self.steps, position, step, self._ledgers[current], self._ledgers[1 - current],
                         report, report_row)
            self._state = (step, 1 - current)

    def restore(self):
        if self.position != -1:
            self.move(-1)

    def grow(self, capacity):
        """Give the ledgers room for `capacity` saved elements (only while at w0)."""
        if self.position != -1:
            raise RuntimeError("adapeft.GroupPerturbation.grow: restore the group first")
        if capacity > self.capacity:
            self._ledgers = self._new_ledgers(capacity)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def __del__(self):
        if getattr(self, "_state", (-1, 0))[0] != -1:
            warnings.warn("adapeft.GroupPerturbation was deleted while perturbed; restoring w0", RuntimeWarning)
            self.restore()
