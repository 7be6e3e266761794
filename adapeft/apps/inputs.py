"""What the command line reads: tables of labelled texts (CSV, TSV, JSON Lines, JSON), text for a language model
(those tables or a plain .txt file) and probe records, checked, with errors that name the file and say what is
wrong."""
import collections
import csv
import json
import math
import os

from ..select import MAX_COUNT
from .common import InputError

DATA_FORMATS = (".csv", ".tsv", ".jsonl", ".json")
TEXT_FORMATS = (".txt",) + DATA_FORMATS
TEXT_COLUMN = "text"  # the column of the texts in a table, unless --text-column names another
RECORD_FORMATS = ("adapeft.probe/1", "adapeft.demo/1")
RECORD_WRITERS = "`adapeft probe` writes probe records as probe.json, `adapeft demo` as results.json, the " \
                 "training callbacks as adapeft_probe.json"
# Imported only by the commands that need them; a missing one is an installation matter, not a bug.


def _read_rows(path):
    """The rows of a .csv, .tsv, .jsonl or .json file, as dicts."""
    where = f"--data {path}"
    if os.path.isdir(path):
        raise InputError(f"{where} is a folder; give the data file in it")
    if not os.path.isfile(path):
        raise InputError(f"{where}: no such file")
    if not path.endswith(DATA_FORMATS):
        raise InputError(f"{where}: not a {', '.join(DATA_FORMATS)} file (the format is read from the name)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:  # -sig: a spreadsheet's byte-order mark
            if path.endswith(".jsonl"):
                return [_json_row(line, where, number) for number, line in enumerate(handle, 1) if line.strip()]
            if path.endswith(".json"):
                try:
                    rows = json.load(handle)
                except json.JSONDecodeError as error:
                    raise InputError(f"{where} is not JSON ({json_error(error)})") from None
                if not isinstance(rows, list):
                    raise InputError(f"{where} holds a JSON {type(rows).__name__}, not a list of rows")
                return rows
            return list(csv.DictReader(handle, delimiter="\t" if path.endswith(".tsv") else ","))
    except UnicodeDecodeError:
        raise InputError(f"{where} is not UTF-8 text") from None


def _json_row(line, where, number):
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: line {number} is not JSON ({error.msg})") from None


def json_error(error):
    return f"{error.msg} at line {error.lineno}, column {error.colno}"


def read_table(path, text_column, label_column):
    """(texts, labels as strings) of a data file, every row checked for both columns (text_column None:
    TEXT_COLUMN)."""
    if path.endswith(".txt"):
        raise InputError(f"--data {path}: a .txt file is text without labels, which --task causal-lm reads; a "
                         f"classifier reads a {', '.join(DATA_FORMATS)} table of texts and labels")
    text_column = TEXT_COLUMN if text_column is None else text_column
    rows = _rows_with(path, (text_column, "--text-column"),
                      (label_column, "--label-column (or, for text without labels, give --task causal-lm)"))
    return [str(row[text_column]) for row in rows], [str(row[label_column]) for row in rows]


def read_texts(path, text_column):
    """The documents of a language model's data file: a .txt file's whole text as one, or the column
    `text_column` (None: TEXT_COLUMN) of every row of a table."""
    if not path.endswith(".txt"):
        if os.path.isfile(path) and not path.endswith(DATA_FORMATS):
            raise InputError(f"--data {path}: not a {', '.join(TEXT_FORMATS)} file (the format is read from the name)")
        column = TEXT_COLUMN if text_column is None else text_column
        return [str(row[column]) for row in _rows_with(path, (column, "--text-column"))]
    if text_column is not None:
        raise InputError(f"--text-column {text_column!r}: --data {path} is a .txt file, one text without columns; give "
                         f"a {', '.join(DATA_FORMATS)} table to read a column of")
    if not os.path.isfile(path):
        raise InputError(f"--data {path}: no such file")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise InputError(f"--data {path} is not UTF-8 text") from None
    if not text.strip():
        raise InputError(f"--data {path} holds no text")
    return [text]


def _rows_with(path, *columns):
    """The rows of a data file, each checked for a value in every one of `columns`, (name, flag) pairs."""
    rows = _read_rows(path)
    if not rows:
        raise InputError(f"--data {path} has no rows")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise InputError(f"--data {path}: row {number} is a {type(row).__name__}, not a row of named columns")
        for column, flag in columns:
            if number == 1 and column not in row:
                raise InputError(f"--data {path} has no column {column!r}; its columns are {sorted(map(str, row))}. "
                                 f"Name the right one with {flag}")
            if row.get(column) in (None, ""):
                raise InputError(f"--data {path}: row {number} has no value in column {column!r}")
    return rows


def label_warnings(labels, batch, data, label_column):
    """What a user should hear about the labels of --data before training on batches of `batch` rows: an
    InputError for fewer than two labels, a warning (returned) where every batch is all the rows or where a
    label is so rare that a batch holds fewer than two of its rows on average."""
    counts = collections.Counter(labels)
    if len(counts) < 2:
        raise InputError(f"--data {data}: every row has the label {labels[0]!r} in column {label_column!r}"
                         " (--label-column); a classifier needs at least two labels to learn anything")
    if len(labels) <= batch:
        if len(labels) < batch:
            return [f"--batch {batch} is more than the {len(labels)} rows of {data}: every step trains and probes "
                    f"on all {len(labels)} rows"]
        return []
    few = [f"{label!r} ({count} of {len(labels)} rows)" for label, count in sorted(counts.items())
           if count * batch < 2 * len(labels)]  # rows a batch holds on average: count * batch / rows
    if not few:
        return []
    return [f"labels of which a batch holds fewer than 2 rows on average (--batch {batch}): {', '.join(few)}; most "
            "batches hold one of them or none, so the probe measures mostly the other labels"]


def load_record(path, history=False):
    """A probe record (from `adapeft probe` or `adapeft demo`), checked for the fields `select` reads
    (groups, counts, appi) and, with history=True, those `plot` reads too (ppi_history)."""
    def problem(what):
        return InputError(f"--probe {path}{what}; {RECORD_WRITERS}")

    if os.path.isdir(path):
        raise problem(" is a folder; give the record file in it, such as probe.json")
    if not os.path.isfile(path):
        raise problem(": no such file")
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except UnicodeDecodeError:
        raise problem(" is not JSON (not even UTF-8 text)") from None
    except json.JSONDecodeError as error:
        raise problem(f" is not JSON ({json_error(error)})") from None
    found = record.get("format") if isinstance(record, dict) else f"a JSON {type(record).__name__}"
    if found not in RECORD_FORMATS:
        raise problem(f" is not a probe record (format {found!r}, not {' or '.join(RECORD_FORMATS)})")
    fields = ("groups", "counts", "appi") + (("ppi_history",) if history else ())
    missing = [name for name in fields if name not in record]
    if missing:
        raise problem(f" lacks the field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} of a probe "
                      "record")
    groups = record["groups"]
    if not (isinstance(groups, list) and groups and all(isinstance(name, str) for name in groups)
            and len(set(groups)) == len(groups)):
        raise problem(f": field 'groups' must be a list of distinct group names, got {_short(groups)}")
    lists = [("counts", record["counts"], True), ("appi", record["appi"], False)]
    if history:
        steps = record["ppi_history"]
        if not isinstance(steps, list) or not steps:
            raise problem(f": field 'ppi_history' must be a non-empty list of probe steps, got {_short(steps)}")
        lists += [(f"ppi_history[{number}]", step, False) for number, step in enumerate(steps)]
    for name, values, whole in lists:
        if not (isinstance(values, list) and len(values) == len(groups)
                and all(_is_number(v) and v >= whole and (not whole or v == int(v)) for v in values)):
            wanted = "whole numbers >= 1" if whole else "numbers >= 0"
            raise problem(f": field {name!r} must be a list of {len(groups)} {wanted} (one per group), got "
                          f"{_short(values)}")
    if any(count > MAX_COUNT for count in record["counts"]):
        raise problem(f": field 'counts' holds a group of more than 2^42 parameters, got {_short(record['counts'])}")
    if not all(math.isfinite(a * n) for a, n in zip(record["appi"], record["counts"])):
        raise problem(": its values (appi x counts) overflow to infinity; field 'appi' is not a probe's")
    adapted = record.get("adapted_modules")
    if adapted is not None and not (isinstance(adapted, dict) and set(adapted) == set(groups) and all(
            isinstance(found, list) and all(isinstance(module, str) for module in found) for found in adapted.values())):
        raise problem(": field 'adapted_modules' must map every group to a list of module names, got "
                      f"{_short(adapted)}")
    rank = record.get("lora_rank")
    if rank is not None and not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise problem(f": field 'lora_rank' must be a positive whole number, got {_short(rank)}")
    budget = record.get("budget")
    if budget is not None and not (_is_number(budget) and 0 <= budget <= 1):
        raise problem(f": field 'budget' must be a share of the parameters in [0, 1] or null, got {_short(budget)}")
    return record


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value, limit=60):
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


# The commands -------------------------------------------------------------------------------------------


def squared_gradient_values(record, path):
    """A record's |g|^2 values (field squared_gradient), checked: one number >= 0 a group."""
    values = record.get("squared_gradient")
    if values is None:
        raise InputError(f"--values squared-gradient: --probe {path} has no field 'squared_gradient' (records of "
                         "adapeft probe keep it, and those of adapeft demo --task causal-lm or --compare and the "
                         "training callbacks' adapeft_probe.json; probe again to have it)")
    if not (isinstance(values, list) and len(values) == len(record["groups"])
            and all(_is_number(value) and value >= 0 for value in values)):
        raise InputError(f"--probe {path}: field 'squared_gradient' must be a list of {len(record['groups'])} numbers "
                         f">= 0 (one per group), got {_short(values)}")
    return values


def horizon_values(record, horizon, path):
    """The knapsack's values of a probe record's groups for a training of `horizon` steps (adapeft.select's
    horizon=), from every probe's PPI, b, A, R^2, verdict and eta (its parts', folded into the groups, where it probed
    parts)."""
    import torch

    from ..groups import ParameterGroups
    from ..probe.prober import R2_THRESHOLD
    from ..probe.result import VERDICT
    from ..select import concave_fits, reached_value
    names, counts, history = _probe_history(record, path)

    def numbers(values):
        return torch.tensor([math.nan if value is None else value for value in values], dtype=torch.float64)

    counts = torch.tensor(counts, dtype=torch.float64)
    threshold = record.get("r2_threshold", R2_THRESHOLD)
    if not _is_number(threshold):
        raise InputError(f"--probe {path}: field 'r2_threshold' must be a number, got {_short(threshold)}")
    totals = dict.fromkeys(record["groups"], 0.0)
    for probe in history:
        ppi, verdict = numbers(probe["ppi"]), probe.get("verdict")
        accepted = ppi > 0
        # Records of before verdicts were kept value accepted fits only.
        concave = torch.zeros_like(accepted) if verdict is None else concave_fits(
            torch.tensor([VERDICT[name] for name in verdict]), numbers(probe["r2"]), threshold)
        value = reached_value(horizon, probe["eta"], numbers(probe["b"]), numbers(probe["A"]),
                              torch.where(accepted, ppi, torch.zeros_like(ppi)), accepted, concave, counts)
        for name, reduction in zip(names, (value * counts).tolist()):
            totals[ParameterGroups.whole(name)] += reduction
    return [totals[name] for name in record["groups"]]


def _probe_history(record, path):
    """(the probed groups' names, their counts, every probe's fields) of a record, checked for what horizon values read:
    the record's own groups, or its "parts" (each a part of one of its groups, every group with a part)."""
    from ..groups import ParameterGroups
    from ..probe.result import VERDICTS

    def problem(field, wanted, found):
        return InputError(f"--probe {path}: field {field!r} must be {wanted}, got {_short(found)}")

    groups = record["groups"]
    probed, prefix = (record["parts"], "parts.") if "parts" in record else (record, "")
    if not isinstance(probed, dict):
        raise problem("parts", "the probed parts' groups, counts and probe history", probed)
    history = probed.get("probe_history")
    if not (isinstance(history, list) and history and all(
            isinstance(probe, dict) and _is_number(probe.get("eta")) for probe in history)):
        raise InputError(f"--horizon: --probe {path} does not keep every probe's eta (written before records "
                         "kept it, or without a probe history); probe again to choose at a horizon")
    names, counts = probed.get("groups"), probed.get("counts")
    if prefix:
        if not (isinstance(names, list) and names and all(isinstance(name, str) for name in names)
                and len(set(names)) == len(names)):
            raise problem("parts.groups", "a list of distinct part names", names)
        wholes = {ParameterGroups.whole(name) for name in names}
        if wholes != set(groups):
            raise problem("parts.groups", f"parts of the record's {len(groups)} groups, each with a part", names)
        if not (isinstance(counts, list) and len(counts) == len(names)
                and all(_is_number(c) and c >= 1 and c == int(c) for c in counts)):
            raise problem("parts.counts", f"a list of {len(names)} whole numbers >= 1 (one per part)", counts)
    k = len(names)
    for number, probe in enumerate(history):
        where = f"{prefix}probe_history[{number}]"
        if probe["eta"] <= 0:
            raise problem(f"{where}.eta", "the probe's step, a number > 0", probe["eta"])
        verdict = probe.get("verdict")
        for field in ("ppi", "b", "A") + (("r2",) if verdict is not None else ()):
            values = probe.get(field)
            if not (isinstance(values, list) and len(values) == k
                    and all(value is None or _is_number(value) for value in values)):
                raise problem(f"{where}.{field}", f"a list of {k} numbers or nulls (one per group probed)", values)
        if any(value is not None and value < 0 for value in probe["ppi"]):
            raise problem(f"{where}.ppi", "numbers >= 0 or nulls", probe["ppi"])
        if verdict is not None and not (isinstance(verdict, list) and len(verdict) == k
                                        and all(name in VERDICTS for name in verdict)):
            raise problem(f"{where}.verdict", f"a list of {k} verdicts ({', '.join(VERDICTS)})", verdict)
    return names, counts, history
