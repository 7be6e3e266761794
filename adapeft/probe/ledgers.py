"""The ledgers every group's moves share, and each group's GroupPerturbation, kept from probe to probe."""
from ..ops import layout as L
from .. import ops
from ..perturb import GroupPerturbation

# Ledger room the prober starts with: every element of the largest group where it has at most SAVE_ALL_BELOW
# (a few MB, so that no first probe of small groups such as LoRA's runs its ledger full and is lost), else that
# many or a share of its elements, whichever is more; it grows when a probe needs more.
CAPACITY_FRACTION = 1 / 64
SAVE_ALL_BELOW = 1 << 20


class SharedLedgers:
    """One pair of ledgers for all groups (they are moved one at a time), sized for the largest and grown when a
    probe needed more room; and the groups' GroupPerturbations, kept while their tensors and the ledgers stay
    the same, so that tables are built once and every address stays fixed (what a CUDA graph replays)."""

    def __init__(self, device):
        self.device = device
        self.ledgers = None
        self._fingerprints = None  # of the groups the ledgers were sized for
        self._entry_words = {}  # ledger words an entry of each probed group takes
        self._most_words = {}  # ledger words that saving every element of a group would take
        self._capacity_words = 0
        self.perturbations = {}  # group name: its GroupPerturbation

    @property
    def nbytes(self):
        """Bytes the ledgers take on the device."""
        return sum(t.numel() * t.element_size() for t in self.ledgers or ())

    def entry_words(self, names):
        """Ledger words one saved element of each group takes (1 for a group never moved by the ledgers)."""
        return [self._entry_words.get(name, 1) for name in names]

    def _ensure(self, plans):
        self._entry_words = {name: max(L.entry_words(p.dtype) for p in plan.params) for name, plan in plans.items()}
        self._most_words = {name: sum(p.numel() for p in plan.params) * self._entry_words[name]
                            for name, plan in plans.items()}
        chunks = max(L.count_chunks(plan.params) for plan in plans.values())
        words = max(_starting_entries(sum(p.numel() for p in plan.params)) * self._entry_words[name]
                    for name, plan in plans.items())
        self._capacity_words = max(self._capacity_words, words)
        size = L.LEDGER_HEADER_WORDS + chunks + self._capacity_words
        if self.ledgers is None or self.ledgers[0].numel() < size:
            self.ledgers = [ops.new_ledger(chunks, size - L.LEDGER_HEADER_WORDS - chunks, self.device)
                            for _ in range(2)]

    def grow(self, demand, unmoved):
        """Room for the next probe: `demand` holds the ledger words each group is expected to need (never more than
        saving all its elements takes), `unmoved` whether the last probe left chunks unmoved."""
        needed_words = max((min(words, self._most_words.get(name, words)) for name, words in demand.items()),
                           default=0)
        if needed_words > self._capacity_words or unmoved:
            self._capacity_words = max(needed_words, self._capacity_words) * 5 // 4
            self.ledgers = None

    def perturbations_for(self, plans, names, steps):
        """{group name: GroupPerturbation} for the groups in `plans` (in `names` order), group k reading its steps
        from row k of `steps`."""
        fingerprints = {name: plan.fingerprint() for name, plan in plans.items()}
        # The ledgers' size depends on what the fingerprints hold (sizes and dtypes) and on the capacity the last
        # probes needed (a growth drops the ledgers).
        if self.ledgers is None or fingerprints != self._fingerprints:
            self._ensure(plans)
            self._fingerprints = fingerprints
        perturbations = {}
        for k, name in enumerate(names):
            if name not in plans:
                continue
            plan = plans[name]
            cached = self.perturbations.get(name)
            if cached is None or cached.fingerprint != fingerprints[name] or \
                    any(mine is not ours for mine, ours in zip(cached.ledgers, self.ledgers)) or \
                    (plan.hyper is not None and cached.hyper.shape != plan.hyper.shape):
                cached = GroupPerturbation(plan.params, plan.directions, steps[k], states=plan.states,
                                           layout=plan.layout, hyper=plan.hyper, ledgers=self.ledgers)
                self.perturbations[name] = cached
            elif plan.hyper is not None:
                cached.hyper.copy_(plan.hyper)  # the bias corrections move with the optimizer's step count
            perturbations[name] = cached
        return perturbations


def _starting_entries(elements):
    return min(elements, max(SAVE_ALL_BELOW, int(elements * CAPACITY_FRACTION)))
