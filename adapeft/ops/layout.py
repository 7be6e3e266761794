"""Memory layouts of the group table, the ledger and the report (mirror of csrc/layout.h).

tests/test_build.py (test_layout_matches_extension) checks every constant here against the compiled extension.
"""
import torch

CHUNK_SHIFT = 12
CHUNK_ELEMENTS = 1 << CHUNK_SHIFT

TABLE_HEADER_WORDS = 4  # num_tensors, num_chunks, num_elements, layout version
TABLE_TENSOR_WORDS = 8  # param pointer, direction pointer, numel, dtype codes and kind, three state pointers
TABLE_LAYOUT_VERSION = 2
CHUNK_TENSOR_SHIFT = 40

# Direction kinds and the optimizer hyperparameters of each tensor (a row of HYPER_WORDS float64).
DIRECTION_TENSOR, DIRECTION_ADAM, DIRECTION_SGD = 0, 1, 2
STATES_PER_TENSOR = 3
HYPER_WORDS = 8
HYPER_LAMBDA, HYPER_SIGN = 0, 1
HYPER_BETA1, HYPER_BETA2, HYPER_EPS, HYPER_BIAS_CORRECTION1, HYPER_BIAS_CORRECTION2_SQRT = 2, 3, 4, 5, 6
HYPER_GRAD_COEFFICIENT, HYPER_BUFFER_COEFFICIENT = 2, 3

LEDGER_HEADER_WORDS = 2
LEDGER_DEMAND = 0
DIRECTORY_OFFSET_SHIFT = 16
DIRECTORY_COUNT_MASK = 0xFFFF
CHUNK_UNMOVED = 0xFFFF
ENTRY_POSITION_SHIFT = 32

REPORT_FIELDS = ("step", "changed", "unmoved", "saved", "nonfinite")
REPORT_STEP, REPORT_CHANGED, REPORT_UNMOVED, REPORT_SAVED, REPORT_NONFINITE = range(len(REPORT_FIELDS))

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
# A tensor's codes word in the group table, a byte each: param dtype, direction dtype, direction kind, state dtype.
TENSOR_CODE_SHIFTS = (0, 8, 16, 24)
# Integer views of each storage dtype, to compare and save bits.
BITS_DTYPES = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
               torch.float64: torch.int64}


def arithmetic_dtype(dtype):
    """The dtype a step is computed in: float32 for storage of 32 bits or fewer, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor_codes(param, direction, kind, state):
    """A tensor's codes word: its param's, direction's and states' DTYPE_CODES and its direction kind."""
    return sum(code << shift for code, shift in zip((param, direction, kind, state), TENSOR_CODE_SHIFTS))


def entry_words(dtype):
    """Ledger words one saved element of this dtype takes."""
    return 2 if dtype == torch.float64 else 1


def chunks_of(numel):
    return (numel + CHUNK_ELEMENTS - 1) >> CHUNK_SHIFT


def count_chunks(params):
    return sum(chunks_of(p.numel()) for p in params)


def ledger_words(num_chunks, capacity):
    """Words of a ledger able to hold `capacity` entries for a group of `num_chunks` chunks."""
    return LEDGER_HEADER_WORDS + num_chunks + capacity


def _fnv1a(value, word):
    for byte in range(8):
        value ^= (word >> (8 * byte)) & 0xFF
        value = (value * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


def group_fingerprint(params, directions, states=(), layout=()):
    """Same value as the extension's group_fingerprint (FNV-1a over the layout, and each tensor's pointer,
    numel, dtype and contiguity)."""
    value = 0xCBF29CE484222325
    value = _fnv1a(value, len(params))
    value = _fnv1a(value, len(directions))
    value = _fnv1a(value, len(states))
    value = _fnv1a(value, len(layout))
    for word in layout:
        value = _fnv1a(value, word & 0xFFFFFFFFFFFFFFFF)
    for tensors in (params, directions, states):
        for t in tensors:
            pointer = t.data_ptr() if t.numel() else 0
            value = _fnv1a(value, pointer & 0xFFFFFFFFFFFFFFFF)
            value = _fnv1a(value, t.numel())
            value = _fnv1a(value, DTYPE_CODES.get(t.dtype, -1) & 0xFFFFFFFFFFFFFFFF)
            value = _fnv1a(value, 1 if t.is_contiguous() else 0)
    return value - (1 << 64) if value >= (1 << 63) else value
