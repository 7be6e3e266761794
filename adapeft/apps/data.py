"""A real text-classification task present on every machine with Python: which part of the standard
library a docstring comes from.

The texts are the first paragraphs of the docstrings of the public functions, classes and methods of
standard-library modules, written by the CPython developers; the label is the family of the module
(text, numbers, files, formats, networking, concurrency, time, containers). The set is deterministic for
a given Python version (docstrings change a little between versions); the train/test split is by a hash
of the text, so a docstring never lands on both sides.
"""
import hashlib
import importlib
import inspect
import re
import warnings

FAMILIES = {
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "codecs", "shlex", "gettext", "locale"),
    "numbers": ("math", "cmath", "decimal", "fractions", "random", "statistics", "numbers"),
    "files": ("os", "os.path", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "stat", "io"),
    "formats": ("json", "csv", "configparser", "plistlib", "xml.etree.ElementTree", "xml.dom.minidom", "html.parser",
                "base64", "zipfile", "tarfile", "gzip", "pickle"),
    "networking": ("socket", "ssl", "http.client", "http.server", "urllib.request", "urllib.parse", "smtplib",
                   "ftplib", "email.message", "ipaddress", "selectors"),
    "concurrency": ("threading", "multiprocessing", "concurrent.futures", "asyncio", "queue", "sched", "subprocess",
                    "signal"),
    "time": ("datetime", "time", "calendar", "zoneinfo", "timeit"),
    "containers": ("collections", "itertools", "functools", "heapq", "bisect", "array", "copy", "operator",
                   "dataclasses", "enum", "weakref"),
}
LABELS = tuple(FAMILIES)


def _first_paragraph(doc):
    text = inspect.cleandoc(doc).split("\n\n")[0]
    return re.sub(r"\s+", " ", text).strip()


def _docstrings(module):
    found = []
    package = module.__name__.split(".")[0]
    for name, member in sorted(vars(module).items()):
        home = getattr(member, "__module__", None) or ""
        if name.startswith("_") or home.split(".")[0] != package:
            continue
        if inspect.isclass(member):
            found.append(member.__doc__)
            found += [getattr(member, attr).__doc__ for attr in sorted(vars(member))
                      if not attr.startswith("_") and callable(getattr(member, attr, None))]
        elif callable(member):
            found.append(member.__doc__)
    return found


def stdlib_docstrings(min_chars=40, max_per_label=600):
    """[(text, label index)] over all families: unique first paragraphs of at least `min_chars`, at most
    `max_per_label` per family (the first in a fixed order), sorted by a hash of the text."""
    seen, examples = set(), []
    for label, modules in enumerate(FAMILIES.values()):
        texts = []
        for module_name in modules:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module = importlib.import_module(module_name)
            except ImportError:
                continue
            for doc in _docstrings(module):
                if not isinstance(doc, str):
                    continue
                text = _first_paragraph(doc)
                if len(text) >= min_chars and text not in seen:
                    seen.add(text)
                    texts.append(text)
        examples += [(text, label) for text in texts[:max_per_label]]
    return sorted(examples, key=lambda example: _digest(example[0]))


def _digest(text):
    return hashlib.sha256(text.encode()).hexdigest()


def train_test_split(examples, test_share=0.2):
    """Split by the hash of each text: stable, and independent of the order examples come in."""
    test_cut = int(test_share * 2**32)
    train, test = [], []
    for text, label in examples:
        (test if int(_digest(text)[:8], 16) < test_cut else train).append((text, label))
    return train, test
