"""Pure-PyTorch twins of the adapeft ops on groups (pack_group, perturb_, quadratic_fit); the knapsack ops' are in
adapeft.ops.knapsack_reference.

Each function computes exactly what the compiled op computes (the perturbed and restored parameters
bit for bit, the same ledger and report layout; sums in float64, in another order), one tensor at a
time with ordinary torch operations. They are the ground truth of the tests, the fallback where a
compiled kernel is missing, and the "pure PyTorch" baseline of the benchmarks.
"""
import numpy as np
import torch

from .. import fit
from . import layout as L

_SUPPORTED = tuple(L.DTYPE_CODES)


def _check_group(params, directions, states=(), layout=(), op="adapeft.pack_group"):
    per_tensor = L.STATES_PER_TENSOR + 1
    if layout and len(layout) != per_tensor * len(params):
        raise ValueError(f"{op}: layout must be empty or hold {per_tensor} integers per tensor "
                         f"({per_tensor * len(params)}), got {len(layout)}")
    for i, p in enumerate(params):
        if not layout:
            break
        kind = layout[i * per_tensor]
        if kind not in (L.DIRECTION_TENSOR, L.DIRECTION_ADAM, L.DIRECTION_SGD):
            raise ValueError(f"{op}: layout gives tensor {i} the unknown direction kind {kind}")
        named = [j for j in layout[i * per_tensor + 1:(i + 1) * per_tensor] if j >= 0]
        if named and kind == L.DIRECTION_TENSOR:
            raise ValueError(f"{op}: tensor {i} has a given direction and must not name optimizer states")
        for j in named:
            if j >= len(states):
                raise ValueError(f"{op}: layout names states[{j}] for tensor {i} but there are {len(states)} states")
            st = states[j]
            if st.device != p.device or st.shape != p.shape or not st.is_contiguous():
                raise ValueError(f"{op}: states[{j}] must be a contiguous tensor of the shape of params[{i}] on its "
                                 "device")
            if st.dtype not in (torch.float32, p.dtype):
                raise ValueError(f"{op}: states[{j}] has dtype {st.dtype}; it must be float32 or the dtype of "
                                 f"params[{i}]")
        if len({states[j].dtype for j in named}) > 1:
            raise ValueError(f"{op}: the states of tensor {i} must share one dtype")
    if len(params) != len(directions):
        raise ValueError(f"{op}: params has {len(params)} tensors but directions has {len(directions)}; "
                         "give one direction per parameter")
    for i, (p, d) in enumerate(zip(params, directions)):
        if p.device != params[0].device:
            raise ValueError(f"{op}: params[{i}] is on {p.device} but params[0] is on {params[0].device}; "
                             "a group lives on one device")
        if d.device != p.device:
            raise ValueError(f"{op}: directions[{i}] is on {d.device} but params[{i}] is on {p.device}")
        if p.dtype not in _SUPPORTED:
            raise ValueError(f"{op}: params[{i}] has dtype {p.dtype}; supported are float32, bfloat16, float16 and "
                             "float64")
        if d.dtype not in (torch.float32, p.dtype):
            raise ValueError(f"{op}: directions[{i}] has dtype {d.dtype}; it must be float32 or the dtype of "
                             f"params[{i}] ({p.dtype})")
        if d.shape != p.shape:
            raise ValueError(f"{op}: directions[{i}] has shape {tuple(d.shape)} but params[{i}] has shape "
                             f"{tuple(p.shape)}")
        if not p.is_contiguous():
            raise ValueError(f"{op}: params[{i}] is not contiguous (a strided view); perturb the contiguous tensor "
                             "it views instead")
        if not d.is_contiguous():
            raise ValueError(f"{op}: directions[{i}] is not contiguous; pass direction.contiguous()")
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), i)
                   for i, p in enumerate(params) if p.numel())
    for (_, end, i), (begin, _, j) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(f"{op}: params[{i}] and params[{j}] overlap in memory; a tensor (tied or shared "
                             "weights included) must appear once in a group")
    for name, readers in (("directions", directions), ("states", states)):
        for i, d in enumerate(readers):
            if not d.numel():
                continue
            begin, end = d.data_ptr(), d.data_ptr() + d.numel() * d.element_size()
            for p_begin, p_end, j in spans:
                if p_begin < end and begin < p_end:
                    raise ValueError(f"{op}: {name}[{i}] overlaps params[{j}] in memory; it must not alias the "
                                     "parameters it moves")


def _tensor_layout(layout, i):
    """(kind, state indices) of tensor i."""
    if not layout:
        return L.DIRECTION_TENSOR, [-1] * L.STATES_PER_TENSOR
    per_tensor = L.STATES_PER_TENSOR + 1
    return layout[i * per_tensor], list(layout[i * per_tensor + 1:(i + 1) * per_tensor])


def pack_group(params, directions, states=(), layout=()):
    _check_group(params, directions, states, layout)
    rows, chunk_words, total = [], [], 0
    for i, (p, d) in enumerate(zip(params, directions)):
        kind, named = _tensor_layout(layout, i)
        state_dtype = next((states[j].dtype for j in named if j >= 0), torch.float32)
        codes = L.tensor_codes(L.DTYPE_CODES[p.dtype], L.DTYPE_CODES[d.dtype], kind, L.DTYPE_CODES[state_dtype])
        rows += [p.data_ptr(), d.data_ptr(), p.numel(), codes] + [states[j].data_ptr() if j >= 0 else 0 for j in named]
        rows += [0] * (L.TABLE_TENSOR_WORDS - 4 - L.STATES_PER_TENSOR)
        chunk_words += [(i << L.CHUNK_TENSOR_SHIFT) | c for c in range(L.chunks_of(p.numel()))]
        total += p.numel()
    header = [len(params), len(chunk_words), total, L.TABLE_LAYOUT_VERSION]
    table = torch.tensor(header + rows + chunk_words, dtype=torch.int64)
    return table.to(params[0].device) if params else table


def bits(t):
    return t.view(L.BITS_DTYPES[t.dtype])


def _unsigned_bits(t):
    """The bits of t as int64 values, zero-extended (the int64 bits themselves for float64)."""
    if t.dtype == torch.float64:
        return bits(t)
    width = 8 * t.element_size()
    return bits(t).to(torch.int64) & ((1 << width) - 1)


def _from_unsigned_bits(values, dtype):
    if dtype == torch.float64:
        return values.view(torch.float64)
    width = 8 * torch.empty((), dtype=dtype).element_size()
    signed = torch.where(values >= (1 << (width - 1)), values - (1 << width), values)
    return signed.to(L.BITS_DTYPES[dtype]).view(dtype)


def step_away(w0, s, c=None):
    """round(w0 * c - s) in the arithmetic type of s; c None (or exactly 1) leaves out the product."""
    w = w0.to(s.dtype)
    return ((w if c is None else w * c) - s).to(w0.dtype)


def _step_back(w, s, c=None):
    back = w.to(s.dtype) + s
    return (back if c is None else back / c).to(w.dtype)


def _sqrt_rn(t):
    """Correctly rounded square root (torch's CPU sqrt is vectorised to within an ulp, not exact)."""
    if t.device.type == "cpu":
        return torch.from_numpy(np.sqrt(t.numpy()))
    return torch.sqrt(t)


class DirectionRule:
    """One tensor's direction d = a + lambda * w0 as the kernels form it (see csrc/step_math.h)."""

    def __init__(self, d, tensor_states, kind, hyper_row, dtype):
        arith = L.arithmetic_dtype(dtype)
        scalar = lambda value: torch.tensor(value, dtype=arith, device=d.device)  # noqa: E731
        g = d.reshape(-1).to(arith)
        self.lam = None
        if kind == L.DIRECTION_TENSOR:
            self.a = g
            return
        h = [scalar(float(v)) for v in hyper_row]
        state = [t.reshape(-1).to(arith) if t is not None else torch.zeros_like(g) for t in tensor_states]
        g = h[L.HYPER_SIGN] * g
        if kind == L.DIRECTION_SGD:
            self.a = h[L.HYPER_GRAD_COEFFICIENT] * g + h[L.HYPER_BUFFER_COEFFICIENT] * state[0]
        else:
            one = scalar(1.0)
            m = h[L.HYPER_BETA1] * state[0] + (one - h[L.HYPER_BETA1]) * g
            v = h[L.HYPER_BETA2] * state[1] + (one - h[L.HYPER_BETA2]) * (g * g)
            if tensor_states[2] is not None:
                v = torch.where(state[2] > v, state[2], v)
            denom = _sqrt_rn(v) / h[L.HYPER_BIAS_CORRECTION2_SQRT] + h[L.HYPER_EPS]
            self.a = (m / h[L.HYPER_BIAS_CORRECTION1]) / denom
        if float(h[L.HYPER_LAMBDA]) != 0.0:  # as the kernels decide it: in the arithmetic type
            self.lam = h[L.HYPER_LAMBDA]

    def scale(self, eta):
        """c = 1 - eta * lambda, or None when it is exactly 1."""
        if self.lam is None:
            return None
        c = 1 - eta.to(self.lam.dtype) * self.lam
        return None if float(c) == 1.0 else c

    def full(self, w0):
        return self.a if self.lam is None else self.a + self.lam * w0.to(self.a.dtype)


def direction_rules(params, directions, states=(), layout=(), hyper=None):
    """Each tensor's DirectionRule: its direction as adapeft.perturb_ forms it (an optimizer's update from its
    states and hyper row, or the direction tensor itself)."""
    hyper_rows = hyper.reshape(-1, L.HYPER_WORDS).tolist() if hyper is not None and hyper.numel() else None
    rules = []
    for i, (p, d) in enumerate(zip(params, directions)):
        kind, named = _tensor_layout(layout, i)
        rules.append(DirectionRule(d, [states[j] if j >= 0 else None for j in named], kind,
                                   hyper_rows[i] if hyper_rows else None, p.dtype))
    return rules


def _check_step(params, directions, states, layout, table, fingerprint, hyper, steps, from_step, to_step, ledger_in,
                ledger_out, report, report_row):
    op = "adapeft.perturb_"
    if len(params) != len(directions):
        raise ValueError(f"{op}: params has {len(params)} tensors but directions has {len(directions)}")
    num_chunks = L.count_chunks(params)
    optimizer_kinds = any(_tensor_layout(layout, i)[0] != L.DIRECTION_TENSOR for i in range(len(params)))
    if optimizer_kinds and (hyper.dtype != torch.float64 or hyper.numel() != len(params) * L.HYPER_WORDS):
        raise ValueError(f"{op}: hyper must be float64 with {L.HYPER_WORDS} values per tensor when directions come "
                         "from an optimizer")
    if fingerprint == L.group_fingerprint(params, directions, states, layout):
        if table.numel() != L.TABLE_HEADER_WORDS + L.TABLE_TENSOR_WORDS * len(params) + num_chunks:
            raise ValueError(f"{op}: table does not describe this group; build it with adapeft.pack_group")
    else:
        # This twin reads the tensors themselves, never the table's addresses; it only validates them.
        _check_group(params, directions, states, layout, op)
    if steps.dtype != torch.float32:
        raise ValueError(f"{op}: steps must be float32, got {steps.dtype}")
    for name, index, meaning in (("from_step", from_step, "the unperturbed weights"), ("to_step", to_step, "restore")):
        if not -1 <= index < steps.numel():
            raise ValueError(f"{op}: {name}={index} is outside [-1, {steps.numel()}) (-1 means {meaning})")
    for name, ledger in (("ledger_in", ledger_in), ("ledger_out", ledger_out)):
        if ledger.dtype != torch.int64 or ledger.numel() < L.LEDGER_HEADER_WORDS + num_chunks:
            raise ValueError(f"{op}: {name} must be int64 with at least {L.LEDGER_HEADER_WORDS + num_chunks} words "
                             "for this group; make it with adapeft.new_ledger")
    if from_step >= 0 and ledger_in.data_ptr() == ledger_out.data_ptr():
        raise ValueError(f"{op}: ledger_in and ledger_out must be different ledgers when rebasing from a step")
    if report.dtype != torch.float64 or report.numel() % len(L.REPORT_FIELDS):
        raise ValueError(f"{op}: report must be float64 with {len(L.REPORT_FIELDS)} values per row")
    if not -1 <= report_row < report.numel() // len(L.REPORT_FIELDS):
        raise ValueError(f"{op}: report_row={report_row} is outside [-1, {report.numel() // len(L.REPORT_FIELDS)})")
    return num_chunks


def _rebuild_w0(current, direction, eta, ledger_in, directory, entries_base):
    """`direction` is the tensor's DirectionRule."""
    """w0 of one tensor from its perturbed values: the unmoved chunks as they are, the ledger's
    entries from their saved bits, every other element stepped back."""
    width = L.entry_words(current.dtype)
    counts = directory & L.DIRECTORY_COUNT_MASK
    offsets = directory >> L.DIRECTORY_OFFSET_SHIFT
    unmoved = counts == L.CHUNK_UNMOVED
    element_chunk = torch.arange(current.numel(), device=current.device) >> L.CHUNK_SHIFT
    eta = eta.to(direction.a.dtype)
    w0 = torch.where(unmoved[element_chunk], current, _step_back(current, eta * direction.a, direction.scale(eta)))
    saved = (~unmoved) & (counts > 0)
    chunks = saved.nonzero().flatten()
    if chunks.numel():
        per_chunk = counts[chunks]
        first = torch.repeat_interleave(offsets[chunks], per_chunk)
        chunk_start = torch.cumsum(per_chunk, 0) - per_chunk
        within = torch.arange(int(per_chunk.sum()), device=current.device) - torch.repeat_interleave(
            chunk_start, per_chunk)
        entry = entries_base + first + within * width
        position = (ledger_in[entry] >> L.ENTRY_POSITION_SHIFT) + (
            torch.repeat_interleave(chunks, per_chunk) << L.CHUNK_SHIFT)
        bits = ledger_in[entry + width - 1]
        w0[position] = _from_unsigned_bits(bits if width == 2 else bits & 0xFFFFFFFF, w0.dtype)
    return w0


def perturb_(params, directions, states, layout, table, fingerprint, hyper, steps, from_step, to_step, ledger_in,
             ledger_out, report, report_row=-1):
    num_chunks = _check_step(params, directions, states, layout, table, fingerprint, hyper, steps, from_step, to_step,
                             ledger_in, ledger_out, report, report_row)
    rules = direction_rules(params, directions, states, layout, hyper)
    has_from, has_to = from_step >= 0, to_step >= 0
    header, entries_base = L.LEDGER_HEADER_WORDS, L.LEDGER_HEADER_WORDS + num_chunks
    capacity = ledger_out.numel() - entries_base
    steps = steps.reshape(-1)
    demand = saved = 0
    dot_dir_step = dot_dir_dir = 0.0
    changed = unmoved = nonfinite = 0
    chunk_base = 0
    with torch.no_grad():
        for i, (p, d) in enumerate(zip(params, directions)):
            n = p.numel()
            tensor_chunks = L.chunks_of(n)
            if n == 0:
                continue
            current = p.view(-1)
            direction = rules[i]
            width = L.entry_words(p.dtype)
            directory_slice = slice(header + chunk_base, header + chunk_base + tensor_chunks)
            if has_from:
                w0 = _rebuild_w0(current, direction, steps[from_step], ledger_in, ledger_in[directory_slice],
                                 entries_base)
            else:
                w0 = current.clone()
            element_chunk = torch.arange(n, device=p.device) >> L.CHUNK_SHIFT
            if has_to:
                eta = steps[to_step].to(direction.a.dtype)
                s, c = eta * direction.a, direction.scale(eta)
                moved_to = step_away(w0, s, c)
                flagged = bits(_step_back(moved_to, s, c)) != bits(w0)
                counts = torch.zeros(tensor_chunks, dtype=torch.int64, device=p.device).index_add_(
                    0, element_chunk, flagged.to(torch.int64))
                words = counts * width
                before = demand + torch.cumsum(words, 0) - words
                fits = (counts == 0) | (before + words <= capacity)
                demand += int(words.sum())
                saved += int(counts.sum())
                offsets = torch.where(counts > 0, before, torch.zeros_like(before))
                ledger_out[directory_slice] = torch.where(
                    fits, (offsets << L.DIRECTORY_OFFSET_SHIFT) | counts, torch.full_like(counts, L.CHUNK_UNMOVED))
                moved = fits[element_chunk]
                out = torch.where(moved, moved_to, w0)
                keep = (flagged & moved).nonzero().flatten()
                chunk_of_entry = keep >> L.CHUNK_SHIFT
                kept = torch.where(fits, counts, torch.zeros_like(counts))
                first_of_chunk = torch.cumsum(kept, 0) - kept
                rank = torch.arange(keep.numel(), device=p.device) - first_of_chunk[chunk_of_entry]
                slot = entries_base + before[chunk_of_entry] + rank * width
                position = (keep & (L.CHUNK_ELEMENTS - 1)) << L.ENTRY_POSITION_SHIFT
                if width == 1:
                    ledger_out[slot] = position | _unsigned_bits(w0)[keep]
                else:
                    ledger_out[slot] = position
                    ledger_out[slot + 1] = _unsigned_bits(w0)[keep]
                unmoved += int((~moved).sum())
                changed += int(((bits(out) != bits(w0)) & moved).sum())
                step_along = direction.full(w0).double() * (out.double() - w0.double())
                dot_dir_step += float(torch.where(moved, step_along, torch.zeros_like(step_along)).sum())
            else:
                out = w0
            current.copy_(out)
            full = direction.full(w0)
            dot_dir_dir += float((full.double() ** 2).sum())
            nonfinite += int((~torch.isfinite(full)).sum())
            chunk_base += tensor_chunks
        if report_row >= 0:
            # IEEE division (an empty group gives nan, as the kernels do), not Python's.
            step = -torch.tensor(dot_dir_step, dtype=torch.float64) / dot_dir_dir
            row = report.view(-1, len(L.REPORT_FIELDS))[report_row]
            row.copy_(torch.tensor([float(step), changed, unmoved, saved, nonfinite], dtype=torch.float64))
        ledger_out[:header] = 0


def quadratic_fit(losses, steps, counts, appi=None, r2_threshold=0.99):
    """Batched least squares of dL(x) = -x*b + x^2/2*A in float64, one row per group."""
    op = "adapeft.quadratic_fit"
    if losses.dim() != 2:
        raise ValueError(f"{op}: losses must be K x M (groups x points), got shape {tuple(losses.shape)}")
    groups, points = losses.shape
    if points % 2 != 1 or not 3 <= points <= 15:
        raise ValueError(f"{op}: losses needs an odd number of points between 3 and 15 per group (the middle one "
                         f"unperturbed), got {points}")
    if steps.shape != losses.shape:
        raise ValueError(f"{op}: steps has shape {tuple(steps.shape)} but losses has shape {tuple(losses.shape)}")
    if counts.dim() != 1 or counts.shape[0] != groups:
        raise ValueError(f"{op}: counts must have one entry per group ({groups}), got shape {tuple(counts.shape)}")
    if appi is not None and (appi.shape != (groups,) or appi.dtype not in (torch.float32, torch.float64)
                             or not appi.is_contiguous()):
        raise ValueError(f"{op}: appi must be a contiguous float32 or float64 vector of {groups} groups")
    b, A, r2 = fit.least_squares(losses, steps)
    b, A, r2, accepted, ppi, eta_star = fit.filtered(b, A, r2, counts, r2_threshold)
    if appi is not None:
        appi[accepted] += ppi[accepted].to(appi.dtype)
    return b, A, r2, accepted, ppi, eta_star
