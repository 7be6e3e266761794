"""The `adapeft` command on small and odd input: it checks every flag before loading anything, refuses what it
cannot use with a message that names it (exit status 2, no traceback), never hangs, and is quiet by default.

Each error path runs the real command in a subprocess with a timeout, so that a hang fails the test."""
import argparse
import csv
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch

import adapeft
from adapeft.ops import backend as _backend
from adapeft.apps import cli, common, inputs, probe_command
from adapeft import record as records
from test_select import mlp_prober

pytestmark = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["tea", "rain", "code", "sun", "bread", "snow", "music", "dust", "is", "good", "bad"]
FLAG_CHECK_SECONDS = 15  # an interpreter, torch and adapeft: a few seconds; loading or training takes longer


def adapeft_command(*args, cwd=None, env=None, timeout=60):
    """The `adapeft` command as a user runs it (`python -m adapeft`, which calls the console script's entry point,
    in a fresh interpreter)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "adapeft", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=environment, timeout=timeout)


def refused(done, *fragments):
    """The command stopped with status 2 and a message holding every fragment, without a traceback."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)
    return done.stderr


def tiny_bert_body(folder, tokenizer=True):
    """A 2-layer BERT checkpoint without a task head (as pretrained models come), with a WordPiece vocabulary
    file unless tokenizer=False."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.BertModel(transformers.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=32,
            max_position_embeddings=64)).save_pretrained(folder)
    if tokenizer:
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return folder


def write_csv(path, labels):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i, label in enumerate(labels):
            writer.writerow([f"{WORDS[i % 8]} is {'good' if label == 'pos' else 'bad'}", label])
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"root": root, "model": tiny_bert_body(root / "model"), "bare": tiny_bert_body(root / "bare", False),
            "data": write_csv(root / "data.csv", ["pos", "neg"] * 12),
            "three": write_csv(root / "three.csv", ["pos", "neg", "pos"]),
            "one_label": write_csv(root / "one_label.csv", ["pos"] * 20),
            "skewed": write_csv(root / "skewed.csv", ["pos"] * 17 + ["neg"] * 3)}


def probe_record(groups=("head", "norm", "others"), counts=(10, 100, 1000), appi=(3e-1, 1e-2, 5e-4), steps=2):
    return {"format": "adapeft.probe/1", "model": "tiny", "groups": list(groups), "counts": list(counts),
            "appi": list(appi), "ppi_history": [[a / steps for a in appi]] * steps}


# Version and help ---------------------------------------------------------------------------------------
def test_version_is_the_projects():
    version = re.search(r'^version = "([^"]+)"', open(os.path.join(ROOT, "pyproject.toml")).read(), re.M).group(1)
    assert adapeft.__version__ == version
    done = adapeft_command("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"adapeft {version}"


def subcommands():
    return cli.parser()._subparsers._group_actions[0].choices


def test_every_help_shows_the_defaults():
    for name, command in subcommands().items():
        helped = adapeft_command(name, "--help")
        assert helped.returncode == 0 and "example" in helped.stdout
        for action in command._actions:
            if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)):
                assert f"(default: {action.default})" in helped.stdout, (name, action.dest, helped.stdout)
            elif action.option_strings and not action.required and action.nargs != 0:
                # no value to show: the help says what happens without the option
                assert "default:" in (action.help or ""), (name, action.dest)
        if name == "select":  # the CLI's default method is not the API's, and the help says why
            assert inspect.signature(adapeft.select).parameters["method"].default == "greedy"
            assert "(default: pareto)" in helped.stdout and "adapeft.select defaults to greedy" in helped.stdout


def test_the_probe_help_and_the_readme_give_one_quick_setting_for_a_causal_lm():
    """The quick setting they advise is the probe's own flags, and both give it whole."""
    quick = cli.QUICK_CAUSAL_LM.split()
    args = cli.parser().parse_args(["probe", "--task", "causal-lm", "--model", "m", "--data", "d.txt", *quick])
    defaults = cli.parser().parse_args(["probe", "--task", "causal-lm", "--model", "m", "--data", "d.txt"])
    for flag in quick[::2]:  # each flag it names changes a default
        dest = flag[2:].replace("-", "_")
        assert getattr(args, dest) != getattr(defaults, dest), flag
    assert cli.QUICK_CAUSAL_LM in subcommands()["probe"].format_help()
    with open(os.path.join(ROOT, "README.md")) as readme:
        assert cli.QUICK_CAUSAL_LM in readme.read()


def test_a_long_probe_is_told_the_flags_it_lacks_of_the_quick_setting():
    def quicker(*flags, task="causal-lm"):
        args = cli.parser().parse_args(["probe", "--task", task, "--model", "m", "--data", "d.txt", *flags])
        return probe_command._quicker_flags(args)

    assert quicker() == cli.QUICK_CAUSAL_LM + " --points 3 --slope autograd"
    assert quicker("--steps", "4", "--max-length", "128", "--granularity", "layer") == \
        "--batch 4 --max-length 32 --points 3 --slope autograd"
    assert quicker(*cli.QUICK_CAUSAL_LM.split()) == "--points 3 --slope autograd"  # the quick setting: only this left
    assert quicker(*cli.QUICK_CAUSAL_LM.split(), "--points", "3", "--slope", "autograd") == ""
    assert quicker(task="classification") == "--points 3 --slope autograd"


def test_durations_read_as_a_person_says_them():
    assert [common.duration(seconds) for seconds in (0.04, 8.44, 200, 3599.6, 22320)] == \
        ["0.0 s", "8.4 s", "3 min 20 s", "1 h 0 min", "6 h 12 min"]


# Flags: argparse refuses bad values before anything is loaded -------------------------------------------
PROBE = ["probe", "--model", "no-such-model", "--data", "no-such-data.csv"]
SELECT = ["select", "--probe", "no-such-probe.json"]
PLOT = ["plot", "--probe", "no-such-probe.json"]
BAD_VALUES = [  # (arguments, the flag argparse names); PROBE's --model and --data do not exist either
    (PROBE + ["--batch", "0"], "--batch"), (PROBE + ["--batch", "-3"], "--batch"),
    (PROBE + ["--seed", "-1"], "--seed"), (PROBE + ["--seed", "4294967296"], "--seed"),
    (PROBE + ["--seed", "1.5"], "--seed"),
    (PROBE + ["--batch", "2.5"], "--batch"), (PROBE + ["--steps", "0"], "--steps"),
    (PROBE + ["--every", "-1"], "--every"), (PROBE + ["--max-length", "0"], "--max-length"),
    (PROBE + ["--lr", "0"], "--lr"), (PROBE + ["--lr", "nan"], "--lr"),
    (PROBE + ["--lr", "inf"], "--lr"), (PROBE + ["--lr", "fast"], "--lr"), (PROBE + ["--eta", "-1e-3"], "--eta"),
    (PROBE + ["--eta", "nan"], "--eta"), (PROBE + ["--lora", "query,,value"], "--lora"),
    (PROBE + ["--device", "abacus"], "--device"), (PROBE + ["--compute", "fp32"], "--compute"),
    (SELECT + ["--budget", "1.5"], "--budget"),
    (SELECT + ["--budget", "-0.1"], "--budget"), (SELECT + ["--budget", "nan"], "--budget"),
    (SELECT + ["--method", "exact"], "--method"), (SELECT + ["--method", "best"], "--method"),
    (PLOT + ["--budget", "2"], "--budget"), (["demo", "--budget", "0"], "--budget"),
    (["demo", "--budget", "inf"], "--budget"), (["demo", "--seeds", "0"], "--seeds"),
]


def test_no_option_takes_an_unchecked_number():
    """Every numeric option goes through a checking type: a bare int or float lets 0, -1, nan or inf through
    to the training loop."""
    for name, command in subcommands().items():
        for action in command._actions:
            assert action.type not in (int, float), (name, action.option_strings)


@pytest.mark.parametrize("args, flag", BAD_VALUES, ids=[" ".join(args[-2:]) for args, _ in BAD_VALUES])
def test_bad_flag_values_are_argparse_errors(args, flag, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(args)
    assert stopped.value.code == 2
    assert f"error: argument {flag}: " in capsys.readouterr().err


def test_a_budget_in_percent_is_told_as_a_share(capsys):
    for budget, told in (("5%", "'5%': give a share of the parameters in [0, 1], 5% as 0.05"),
                         ("x%", "'x%': give a share of the parameters in [0, 1]\n")):
        with pytest.raises(SystemExit):
            cli.main(SELECT + ["--budget", budget])
        assert f"error: argument --budget: {told}" in capsys.readouterr().err


# The real command, once for each flag (the values are all tried above).
@pytest.mark.parametrize("args, flag", list({flag + args[0]: (args, flag) for args, flag in BAD_VALUES}.values()),
                         ids=lambda value: " ".join(value[-2:]) if isinstance(value, list) else value)
def test_the_command_refuses_bad_flag_values_before_anything_loads(args, flag, tmp_path):
    started = time.perf_counter()
    done = adapeft_command(*args, cwd=tmp_path)
    message = refused(done, f"error: argument {flag}: ", "usage: adapeft")
    assert message.count("error:") == 1 and time.perf_counter() - started < FLAG_CHECK_SECONDS
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_by_argparse():
    refused(adapeft_command(*PROBE, "--device", "cuda"), "error: argument --device: cuda: 0 CUDA devices")


# Data and folders: refused with what is wrong, before the model is loaded -------------------------------
def test_probe_refuses_data_with_a_single_label(files):
    started = time.perf_counter()
    done = adapeft_command("probe", "--model", files["model"], "--data", files["one_label"],
                           "--out", files["root"] / "single")
    refused(done, "every row has the label 'pos' in column 'label'", "--label-column", "at least two labels")
    assert time.perf_counter() - started < FLAG_CHECK_SECONDS and not (files["root"] / "single").exists()


def test_a_table_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    from adapeft.apps.inputs import read_table
    for suffix, content in ((".csv", "text,label\ntea,a\nrain,b\n"), (".tsv", "text\tlabel\ntea\ta\nrain\tb\n"),
                            (".jsonl", '{"text": "tea", "label": "a"}\n{"text": "rain", "label": "b"}\n')):
        path = tmp_path / f"bom{suffix}"
        path.write_text(content, encoding="utf-8-sig")  # as a spreadsheet's "CSV UTF-8" saves it
        assert read_table(str(path), None, "label") == (["tea", "rain"], ["a", "b"])


@pytest.mark.parametrize("content, suffix, message", [
    ('{"text": "tea", "label": "a"}\n{"text": oops}\n', ".jsonl", "line 2 is not JSON"),
    ("[1, 2", ".json", "is not JSON (Expecting"),
    ('{"rows": []}', ".json", "holds a JSON dict, not a list of rows"),
    ("text,label\ntea,a\nrain,\n", ".csv", "row 2 has no value in column 'label'"),
    ("text,label\n", ".csv", "has no rows"),
    ("text\tlabel\ntea\ta\n", ".md", "not a .csv, .tsv, .jsonl, .json file"),
    ("tea and rain\n", ".txt", "a .txt file is text without labels, which --task causal-lm reads"),
    ("sentence,y\ntea,a\nrain,b\n", ".csv", "has no column 'text'; its columns are ['sentence', 'y']"),
    ('{"text": "tea"}\n', ".jsonl", "has no column 'label'; its columns are ['text']. Name the right one with "
                                    "--label-column (or, for text without labels, give --task causal-lm)"),
])
def test_probe_refuses_data_files_it_cannot_read(files, tmp_path, content, suffix, message):
    data = tmp_path / f"data{suffix}"
    data.write_text(content)
    refused(adapeft_command("probe", "--model", files["model"], "--data", data, "--out", tmp_path / "out"),
            f"--data {data}", message)


def test_probe_refuses_missing_folders_and_files(files, tmp_path):
    refused(adapeft_command("probe", "--model", tmp_path / "nothing", "--data", files["data"]),
            "--model", "no such folder")
    refused(adapeft_command("probe", "--model", tmp_path, "--data", files["data"]),
            "not a Hugging Face model folder (no config.json)")
    refused(adapeft_command("probe", "--model", files["model"], "--data", files["model"]),
            f"--data {files['model']} is a folder; give the data file in it")
    refused(adapeft_command("probe", "--model", files["model"], "--data", tmp_path / "nothing.csv"),
            "--data", "no such file")
    refused(adapeft_command("probe", "--model", files["model"], "--data", files["data"], "--out", files["data"]),
            "--out", "is a file, not a folder")


def test_output_folders_that_cannot_be_written_are_refused_before_any_work(files, tmp_path):
    inside_a_file = files["data"] / "out"  # a folder cannot be made inside a file
    started = time.perf_counter()
    refused(adapeft_command("probe", "--model", files["model"], "--data", files["data"], "--out", inside_a_file),
            f"--out {inside_a_file}: cannot create the folder")
    assert time.perf_counter() - started < FLAG_CHECK_SECONDS
    record = tmp_path / "probe.json"
    record.write_text(json.dumps(probe_record()))
    done = refused(adapeft_command("select", "--probe", record, "--budget", "0.5", "--out", inside_a_file / "s.json"),
                   f"--out {inside_a_file}: cannot create the folder")
    assert "chosen" not in done  # refused before the selection was printed
    refused(adapeft_command("plot", "--probe", record, "--out", inside_a_file), "cannot create the folder")


@pytest.mark.parametrize("labels, batch, warned", [
    (["pos"] * 29 + ["neg"] * 35, 64, None),  # every batch is all the rows: no label is short in any
    (["pos"] * 29 + ["neg"] * 35, 100, "every step trains and probes on all 64 rows"),
    (["pos"] * 61 + ["neg"] * 3, 16, "labels of which a batch holds fewer than 2 rows on average (--batch 16): 'neg' "
                                     "(3 of 64 rows)"),
    (["pos"] * 32 + ["neg"] * 32, 16, None),
    # a batch of 16 holds 4.8 rows of each label on average: none is short, though each has fewer rows than a batch
    (["a"] * 14 + ["b"] * 12 + ["c"] * 14, 16, None),
    (["pos"] * 60 + ["neg"] * 7, 16, "'neg' (7 of 67 rows)"),  # 1.7 rows a batch on average
])
def test_label_warnings_hold_for_the_batches_drawn(labels, batch, warned):
    said = " ".join(inputs.label_warnings(labels, batch, "rows.csv", "label"))
    assert (warned in said) if warned else said == ""


def test_inputs_longer_than_the_model_takes_are_refused(files):
    refused(adapeft_command("probe", "--model", files["model"], "--data", files["data"], "--max-length", "65"),
            "--max-length 65 is more than the 64 positions of --model", "give at most 64")


def test_a_file_given_as_the_model_folder_is_named_a_file(files):
    refused(adapeft_command("probe", "--model", files["data"], "--data", files["data"]),
            f"--model {files['data']} is a file, not a model folder")


def test_a_model_folder_without_tokenizer_files_is_refused(files):
    message = refused(adapeft_command("probe", "--model", files["bare"], "--data", files["data"]),
                      f"--model {files['bare']} has no tokenizer files", "--tokenizer FOLDER_OR_NAME")
    assert all(name in message for name in common.TOKENIZER_FILES)
    refused(adapeft_command("probe", "--model", files["model"], "--tokenizer", files["bare"], "--data", files["data"]),
            f"--tokenizer {files['bare']} has no tokenizer files")
    refused(adapeft_command("probe", "--model", files["model"], "--tokenizer", "./no-such-tokenizer",
                            "--data", files["data"]), "--tokenizer ./no-such-tokenizer: no such folder")
    refused(adapeft_command("demo", "--model", files["bare"]), f"--model {files['bare']} has no tokenizer files")
    refused(adapeft_command("demo", "--model", files["root"] / "nothing"), "--model", "no such folder")


def test_a_tokenizer_without_a_vocabulary_is_refused(files, tmp_path):
    """Files that hold no vocabulary (here a tokenizer.json of special tokens only) load as a tokenizer that
    maps every word to [UNK]; the command refuses it."""
    folder = tmp_path / "specials-only"
    folder.mkdir()
    (folder / "config.json").write_text((files["model"] / "config.json").read_text())
    transformers.AutoTokenizer.from_pretrained(files["model"]).save_pretrained(folder)
    with open(folder / "tokenizer.json") as handle:
        serialised = json.load(handle)
    serialised["model"]["vocab"] = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                        "[MASK]"])}
    with open(folder / "tokenizer.json", "w") as handle:
        json.dump(serialised, handle)
    (folder / "vocab.txt").unlink(missing_ok=True)  # transformers 4 saves one beside tokenizer.json
    done = adapeft_command("probe", "--model", files["model"], "--tokenizer", folder, "--data", files["data"])
    refused(done, f"--tokenizer {folder}: its tokenizer knows only its 5 special tokens", "[UNK]")


def test_a_tokenizer_larger_than_the_models_embeddings_is_refused(files, tmp_path):
    folder = tmp_path / "large-vocabulary"
    folder.mkdir()
    (folder / "config.json").write_text((files["model"] / "config.json").read_text())
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                                [f"word{i}" for i in range(40)]) + "\n")
    refused(adapeft_command("probe", "--model", files["model"], "--tokenizer", folder, "--data", files["data"]),
            "its tokenizer has 45 tokens, but the embeddings of --model", "have 32 rows")


# Real (tiny) probes: they end, and are quiet ------------------------------------------------------------
def test_fewer_rows_than_a_batch_trains_on_all_of_them(files, tmp_path):
    done = adapeft_command("probe", "--model", files["model"], "--data", files["three"], "--batch", "16",
                           "--steps", "2", "--every", "1", "--slope", "autograd", "--compute", "float32",
                           "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"warning: --batch 16 is more than the 3 rows of {files['three']}: every step trains" in done.stderr
    record = json.loads((tmp_path / "probe.json").read_text())
    assert record["format"] == "adapeft.probe/1" and len(record["ppi_history"]) == 2
    # --slope autograd: each probe says how far its five points' slope is from the exact one
    assert all(any(error is not None for error in probe["slope_error"]) for probe in record["probe_history"])


def test_warnings_during_training_get_lines_of_their_own(files, tmp_path):
    """A probe step far below float32's resolution: the prober says so (once a group) on a line of its own, not
    inside the progress bar's."""
    done = adapeft_command("probe", "--model", files["model"], "--data", files["data"], "--batch", "8", "--steps", "3",
                           "--every", "1", "--eta", "1e-12", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    said = re.findall(r"(.?)adapeft probe: warning: adapeft\.Prober: (.*)", done.stderr)
    assert said and all(before in ("", "\n") for before, _ in said), done.stderr
    groups = [group for _, text in said for listed in re.findall(r"did not move: groups \[([^\]]*)\]", text)
              for group in re.findall(r"'(\w+)'", listed)]
    assert groups and len(groups) == len(set(groups)), done.stderr


def test_probe_with_a_separate_tokenizer_is_quiet_and_warns_once_per_cause(files, tmp_path):
    done = adapeft_command("probe", "--model", files["bare"], "--tokenizer", files["model"], "--data", files["skewed"],
                           "--batch", "8", "--steps", "2", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "probe.json").read_text())
    assert len(record["groups"]) == len(record["appi"]) == len(record["ppi_history"][0])
    warned = [line for line in done.stderr.splitlines() if "warning:" in line]
    assert warned == ["adapeft probe: warning: labels of which a batch holds fewer than 2 rows on average (--batch 8): "
                      "'neg' (3 of 20 rows); most batches hold one of them or none, so the probe measures mostly the "
                      "other labels"], done.stderr
    # A checkpoint without the classifier head is the usual case: transformers' report of it is for --verbose.
    for noise in ("LOAD REPORT", "MISSING", "Loading weights", "Warning", "Traceback"):
        assert noise not in done.stderr, done.stderr
    verbose = adapeft_command("probe", "--model", files["bare"], "--tokenizer", files["model"], "--data",
                              files["data"], "--batch", "8", "--steps", "1", "--out", tmp_path, "--verbose")
    assert verbose.returncode == 0 and "LOAD REPORT" in verbose.stderr and "classifier.weight" in verbose.stderr


def test_probe_gives_the_same_record_for_the_same_seed(files, tmp_path):
    """The new head and LoRA start from the seed's weights and the batches come in its order: two runs agree."""
    records = []
    for run, seed in enumerate((0, 0, 1)):
        out = tmp_path / f"run{run}"
        done = adapeft_command("probe", "--model", files["model"], "--data", files["data"], "--batch", "8", "--steps",
                               "2", "--every", "1", "--seed", str(seed), "--out", out)
        assert done.returncode == 0, done.stderr
        records.append(json.loads((out / "probe.json").read_text()))
    assert records[0]["ppi_history"] == records[1]["ppi_history"] and records[0]["appi"] == records[1]["appi"]
    assert records[0]["probe_history"] != records[2]["probe_history"]
    # and the record says how it was run
    assert {key: records[2][key] for key in ("data", "batch", "steps", "every", "seed", "dtype", "max_length")} == {
        "data": str(files["data"]), "batch": 8, "steps": 2, "every": 1, "seed": 1, "dtype": "float32",
        "max_length": 64}


# Probe records: select and plot say what is wrong with the file -----------------------------------------
def bad_records():
    no_history = probe_record()
    del no_history["ppi_history"], no_history["appi"]
    return [
        ("{oops", "is not JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
        ("", "is not JSON (Expecting value at line 1, column 1)"),
        ("[1, 2]", "is not a probe record (format 'a JSON list'"),
        (json.dumps({"format": "adapeft.selection/1"}), "is not a probe record (format 'adapeft.selection/1'"),
        (json.dumps(no_history), "lacks the field"), (json.dumps(no_history), "lacks the field"),
        (json.dumps({**probe_record(), "counts": [10, 100]}), "field 'counts' must be a list of 3 whole numbers"),
        (json.dumps({**probe_record(), "appi": ["a", "b", "c"]}), "field 'appi' must be a list of 3 numbers"),
        (json.dumps({**probe_record(), "groups": "head"}), "field 'groups' must be a list of distinct group names"),
        (json.dumps({**probe_record(), "budget": 3}), "field 'budget' must be a share of the parameters in [0, 1]"),
        (json.dumps({**probe_record(), "counts": [0, 100, 1000]}), "field 'counts' must be a list of 3 whole numbers "
                                                                  ">= 1"),
        (json.dumps({**probe_record(), "counts": [2**43, 100, 1000]}), "holds a group of more than 2^42 parameters"),
        (json.dumps({**probe_record(), "appi": [1e308, 0.1, 0.1]}), "its values (appi x counts) overflow"),
    ]


@pytest.mark.parametrize("number", range(len(bad_records())))
def test_select_and_plot_say_what_a_record_lacks_and_who_writes_one(tmp_path, number):
    content, message = bad_records()[number]
    command = ("select", "plot")[number % 2]  # both read records through one check
    path = tmp_path / "probe.json"
    path.write_text(content)
    done = adapeft_command(command, "--probe", path, "--out", tmp_path / "out")
    if message == "lacks the field":  # plot reads the history too
        message = {"select": "lacks the field 'appi' of a probe record",
                   "plot": "lacks the fields 'appi', 'ppi_history' of a probe record"}[command]
    refused(done, f"--probe {path}", message, "`adapeft probe` writes probe records as probe.json, `adapeft demo` "
                                              "as results.json")
    assert not (tmp_path / "out").exists()


def test_select_and_plot_on_a_missing_file(tmp_path):
    for command in ("select", "plot"):
        refused(adapeft_command(command, "--probe", tmp_path / "nothing.json"), "no such file", "`adapeft probe`")
        refused(adapeft_command(command, "--probe", tmp_path), f"--probe {tmp_path} is a folder; give the record file")


def test_plot_needs_a_probe_history(tmp_path):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({**probe_record(), "ppi_history": []}))
    refused(adapeft_command("plot", "--probe", path, "--out", tmp_path), "field 'ppi_history' must be a non-empty")
    assert adapeft_command("select", "--probe", path).returncode == 0  # select reads no history


def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path):
    """`adapeft select ... | head`: the pipe closes before the frontier is printed; no traceback, exit status 1."""
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_record()))
    command = subprocess.Popen([sys.executable, "-m", "adapeft.apps.cli", "select", "--probe", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    command.stdout.close()
    said = command.stderr.read()
    assert command.wait(timeout=60) == 1 and "Traceback" not in said and "BrokenPipe" not in said, said


def test_select_without_a_budget_shows_the_frontier_and_says_so(tmp_path):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_record()))
    for method in ("pareto", "greedy"):
        done = adapeft_command("select", "--probe", path, "--method", method)
        assert done.returncode == 0, done.stderr
        assert f"no --budget given, so the table is the whole {method} frontier" in done.stdout
        assert "head, norm, others" in done.stdout and "head, norm" in done.stdout
    chosen = adapeft_command("select", "--probe", path, "--budget", "0.1", "--method", "exact",
                             "--out", tmp_path / "picked" / "selection.json")
    assert chosen.returncode == 0 and "no --budget" not in chosen.stdout
    assert adapeft.Selection.load(tmp_path / "picked" / "selection.json").chosen == ["head", "norm"]
    refused(adapeft_command("select", "--probe", path, "--out", tmp_path), "--out", "is a folder")


def test_select_says_why_it_chose_nothing_and_refuses_what_it_cannot_do(tmp_path):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_record()))
    done = adapeft_command("select", "--probe", path, "--budget", "0.005", "--method", "exact")
    assert done.returncode == 0, done.stderr
    assert "chosen: (none)" in done.stdout
    assert ("note: no group of positive value fits in the budget of 0.500% of the parameters (5 of 1,110): the "
            "smallest, 'head', holds 10") in done.stdout
    # ranks shared by value need a record of LoRA adapters
    refused(adapeft_command("select", "--probe", path, "--budget", "0.1", "--lora-ranks", "values"),
            f"--lora-ranks values: --probe {path} names no LoRA adapters' modules")
    if os.path.isdir("/proc") and os.geteuid() == 0:  # a folder root may write to by its mode, yet cannot
        refused(adapeft_command("select", "--probe", path, "--budget", "0.1", "--out", "/proc/selection.json"),
                "--out /proc/selection.json: cannot write the selection there")


def test_select_at_a_horizon_needs_each_probes_eta(tmp_path):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_record()))
    refused(adapeft_command("select", "--probe", path, "--horizon", "20"),
            f"--horizon: --probe {path} does not keep every probe's eta", "probe again")
    refused(adapeft_command("select", "--probe", path, "--horizon", "0"), "--horizon", "must be a positive finite number")


def test_a_records_values_at_a_horizon_are_the_probers():
    """adapeft select --horizon from a record values every probe as select(prober, horizon=) does, concave fits (the
    LayerNorm's here: A <= 0, resolved, R^2 1) and the record's own R^2 threshold included."""
    for threshold in (0.99, 1.0):  # R^2 is 1 to the last bits, and not over 1: no concave fit counts
        prober, batch = mlp_prober(r2_threshold=threshold)
        for eta in (1e-4, 3e-4):
            prober.step(batch, eta)
        record = records.probe_record(prober, prober.groups)
        assert record["r2_threshold"] == threshold
        assert any("A <= 0" in probe["verdict"] for probe in record["probe_history"])
        for horizon in (0.5, 20, 1e6):
            want = adapeft.select(prober, budget=0.5, horizon=horizon).values
            assert inputs.horizon_values(json.loads(json.dumps(record)), horizon, "p.json") == pytest.approx(
                want, rel=1e-12, abs=0)
            assert (want[prober.names.index("norm")] > 0) == (threshold < 1)
    record["r2_threshold"] = "high"
    with pytest.raises(common.InputError, match="--probe p.json: field 'r2_threshold' must be a number"):
        inputs.horizon_values(record, 20, "p.json")


def parts_record():
    """A record of two units probed as four parts, one probe: u@0's parts accepted, u@1's B concave."""
    return {"format": "adapeft.probe/1", "groups": ["u@0", "u@1"], "counts": [20, 40], "appi": [0.5, 0.0],
            "parts": {"groups": ["u@0/lora_A", "u@0/lora_B", "u@1/lora_A", "u@1/lora_B"], "counts": [10, 10, 20, 20],
                      "probe_history": [{"eta": 1e-3, "b": [2.0, 1.0, None, 4.0], "A": [4.0, 0.5, None, -1.0],
                                         "ppi": [0.1, 0.2, 0.0, 0.0], "r2": [1.0, 1.0, None, 0.999],
                                         "verdict": ["accepted", "accepted", "zero direction", "A <= 0"],
                                         "t": [1e-3] * 4}]}}


def test_a_records_history_is_checked_before_a_horizon_reads_it():
    record = parts_record()
    # x = 5 eta = 5e-3, short of every eta* = b/A: the accepted parts 2 (x b - x^2 A/2) (PPI's b^2/A n being twice a
    # step's reduction per parameter), the concave one 2 x b; the unit, its parts' sum
    x = 5e-3
    u0 = (2 * x * 2.0 - x * x * 4.0) + (2 * x * 1.0 - x * x * 0.5)
    assert inputs.horizon_values(record, 5, "p.json") == pytest.approx([u0, 2 * x * 4.0], rel=1e-12)
    history = "parts.probe_history[0]"
    damaged = [(("parts", "probe_history", 0, "A", 0), "high", f"field '{history}.A' must be a list of 4 numbers"),
               (("parts", "probe_history", 0, "ppi"), "high", f"field '{history}.ppi' must be a list of 4"),
               (("parts", "probe_history", 0, "ppi", 1), -1.0, f"field '{history}.ppi' must be numbers >= 0"),
               (("parts", "probe_history", 0, "b"), [1.0] * 3, f"field '{history}.b' must be a list of 4"),
               (("parts", "probe_history", 0, "b"), None, f"field '{history}.b' must be a list of 4"),
               (("parts", "probe_history", 0, "verdict"), "accepted", f"field '{history}.verdict' must be a list"),
               (("parts", "probe_history", 0, "verdict", 0), "fine", f"field '{history}.verdict' must be a list"),
               (("parts", "probe_history", 0, "r2"), None, f"field '{history}.r2' must be a list of 4"),
               (("parts", "probe_history", 0, "eta"), -1.0, f"field '{history}.eta' must be the probe's step"),
               (("parts", "groups", 3), "bogus@9/lora_B", "field 'parts.groups' must be parts of the record's 2"),
               (("parts", "groups"), ["u@0/lora_A", "u@0/lora_B"], "field 'parts.groups' must be parts of the"),
               (("parts", "groups", 1), "u@0/lora_A", "field 'parts.groups' must be a list of distinct part names"),
               (("parts", "counts"), [10, 10, 20], "field 'parts.counts' must be a list of 4 whole numbers"),
               (("parts",), [], "field 'parts' must be the probed parts' groups")]
    for path, value, message in damaged:
        broken = parts_record()
        *inside, last = path
        holder = broken
        for key in inside:
            holder = holder[key]
        holder[last] = value
        with pytest.raises(common.InputError, match=re.escape(f"--probe p.json: {message}")):
            inputs.horizon_values(broken, 5, "p.json")
    del record["parts"]["probe_history"][0]["eta"]
    with pytest.raises(common.InputError, match="--horizon: --probe p.json does not keep every probe's eta"):
        inputs.horizon_values(record, 5, "p.json")


def test_plot_takes_a_budget(tmp_path):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_record()))
    done = adapeft_command("plot", "--probe", path, "--budget", "0.1", "--out", tmp_path / "plots")
    assert done.returncode == 0, done.stderr
    for name in ("ppi_heatmap.png", "appi.png", "pareto.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plots_tick_whole_probe_steps(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from adapeft.apps import plot
    ticks = []

    def saved(plt, fig, path):
        ticks.append(fig.axes[0].get_xticks().tolist())
        plt.close(fig)

    monkeypatch.setattr(plot, "_save", saved)
    for probes, expected in ((1, [0]), (3, [0, 1, 2]), (25, [0, 3, 6, 9, 12, 15, 18, 21, 24])):
        history = [[1.0 + step, 2.0] for step in range(probes)]
        plot.ppi_heatmap(history, ["a", "others"], tmp_path / "h.png")
        plot.appi_curves(history, ["a", "others"], tmp_path / "a.png")
        assert ticks[-2:] == [expected, expected]


def test_a_missing_optional_package_is_named_with_how_to_install_it(tmp_path):
    blocker = tmp_path / "blocked" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\", "
                                         "name='matplotlib')\n")
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_record()))
    first_on_path = os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])
    done = adapeft_command("plot", "--probe", path, "--out", tmp_path, env={"PYTHONPATH": first_on_path})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "No module named 'matplotlib' (pip install 'adapeft[demo]')" in done.stderr


def test_genuine_bugs_are_not_turned_into_messages(tmp_path, monkeypatch):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_record()))

    def broken(**_):
        raise ValueError("a bug inside select")

    monkeypatch.setattr(sys.modules["adapeft.select"], "select", broken)
    with pytest.raises(ValueError, match="a bug inside select"):
        cli.main(["select", "--probe", str(path)])


# The pieces under the command ----------------------------------------------------------------------------
def test_batches_of_data_smaller_than_a_batch_hold_all_of_it():
    data = {"input_ids": torch.arange(30).reshape(3, 10), "labels": torch.tensor([0, 1, 0])}
    stream = common.batches(data, 16, seed=0, device="cpu")
    seen = [next(stream) for _ in range(4)]
    assert all(batch["labels"].numel() == 3 for batch in seen)
    assert all(sorted(batch["input_ids"][:, 0].tolist()) == [0, 10, 20] for batch in seen)
    # An epoch's last partial batch is dropped: every batch has one shape, and every row comes in turn.
    stream = common.batches({"labels": torch.arange(7)}, 3, seed=1, device="cpu")
    first_epoch = torch.cat([next(stream)["labels"] for _ in range(2)])
    assert len(set(first_epoch.tolist())) == 6 and next(stream)["labels"].numel() == 3
    with pytest.raises(ValueError, match="no rows"):
        common.batches({"labels": torch.tensor([], dtype=torch.long)}, 4, seed=0, device="cpu")
    with pytest.raises(ValueError, match="size must be a positive number of rows, got 0"):
        common.batches(data, 0, seed=0, device="cpu")


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=32,
            num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 32, (16, 12), generator=g)
    labels = torch.randint(0, 2, (16,), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return model, batch


def float16_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits.half(), batch["labels"])


def test_a_float16_loss_is_named_once_and_a_float32_one_of_the_same_model_fits():
    """A float16 loss rounds to 1e-3 of its value, more than a probe step moves it: at a fixed step b rounds to
    0. The prober says so once; the same model with its loss in float32 (what adapeft.apps.common.loss_fn does) fits
    every group."""
    model, batch = tiny_classifier()
    common.loss_fn(model, batch).backward()
    prober = adapeft.Prober(model, None, float16_loss, step_policy="fixed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coarse = [prober.step(batch, 1e-3) for _ in range(3)]
    said = [str(w.message) for w in caught if "torch.float16 loss" in str(w.message)]
    assert len(said) == 1 and "Return the loss in float32" in said[0]
    assert all(bool((result.b == 0).any()) for result in coarse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fine = adapeft.Prober(model, None, common.loss_fn).step(batch, 1e-3)
    assert not any("loss" in str(w.message) for w in caught)
    assert bool((fine.b != 0).all())


def test_frozen_groups_of_a_peft_model_get_one_warning():
    from adapeft.algorithm import equip_lora
    model, batch = tiny_classifier()
    model = equip_lora(model, ["query", "value"], r=4, train_all=False)  # peft freezes the base model
    common.loss_fn(model, batch).backward()
    prober = adapeft.Prober(model, None, common.loss_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            result = prober.step(batch, 1e-3)
    frozen = [name for name, probed in zip(result.names, result.probed.tolist()) if not probed]
    said = [str(w.message) for w in caught if "no gradient" in str(w.message)]
    assert len(frozen) >= 4 and len(said) == 1, said
    assert said[0].startswith("adapeft.Prober: tensors without a gradient (frozen or unused) are not probed: ")
    assert all(f"group {name!r}: " in said[0] for name in frozen)


def test_a_model_folder_of_gguf_files_is_told_to_name_one(tmp_path, files):
    folder = tmp_path / "gguf-only"
    folder.mkdir()
    (folder / "tiny-model.Q4_1.gguf").write_bytes(b"GGUF")
    remedy = "it holds tiny-model.Q4_1.gguf: give --task causal-lm --gguf-file tiny-model.Q4_1.gguf"
    refused(adapeft_command("probe", "--model", folder, "--data", files["data"]),
            f"--model {folder} is not a Hugging Face model folder (no config.json)", remedy)
    refused(adapeft_command("demo", "--model", folder), remedy)


def test_a_model_folder_without_weights_is_refused_naming_what_is_missing(files, tmp_path):
    """A config and a tokenizer but no weights: refused before the data are read, not by transformers' traceback
    when it loads the model; weights it still cannot find (a sharded checkpoint's lost part) are named too."""
    folder = tmp_path / "no-weights"
    shutil.copytree(files["model"], folder)
    (folder / "model.safetensors").unlink()
    missing = f"--model {folder} has a config.json but no weight files (looked for *.safetensors, *.bin)"
    started = time.perf_counter()
    refused(adapeft_command("probe", "--model", folder, "--data", files["data"]), missing,
            f"save the model there with model.save_pretrained('{folder}')")
    assert time.perf_counter() - started < FLAG_CHECK_SECONDS
    refused(adapeft_command("probe", "--task", "causal-lm", "--model", folder, "--data", files["data"]), missing)
    refused(adapeft_command("demo", "--model", folder), missing)
    (folder / "tiny.Q8_0.gguf").write_bytes(b"GGUF")
    refused(adapeft_command("probe", "--model", folder, "--data", files["data"]), missing,
            "it holds tiny.Q8_0.gguf: give --task causal-lm --gguf-file tiny.Q8_0.gguf")
    sharded = tmp_path / "sharded"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.BertModel.from_pretrained(files["model"]).save_pretrained(sharded, max_shard_size="20KB")
    shutil.copy(files["model"] / "vocab.txt", sharded)
    lost = sorted(sharded.glob("model-*.safetensors"))[-1]
    lost.unlink()
    refused(adapeft_command("probe", "--model", sharded, "--data", files["data"], "--steps", "1", timeout=120),
            f"--model {sharded}: transformers could not load the model: ", lost.name)


def tiny_llama(folder):
    """A 2-layer Llama causal LM checkpoint, without a tokenizer."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
            vocab_size=32, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def test_a_decoder_classifies_padded_with_its_end_of_text_token(files, tmp_path):
    """A causal LM's folder (Llama's, GPT-2's) probed as a classifier: its config names no padding token and its
    tokenizer often has none; the texts pad with the end-of-text token, and a tokenizer without either is refused."""
    folder = tiny_llama(tmp_path / "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = transformers.AutoTokenizer.from_pretrained(files["model"])
    tokenizer.pad_token, tokenizer.eos_token = None, "[SEP]"
    tokenizer.save_pretrained(folder)
    done = adapeft_command("probe", "--model", folder, "--lora", "q_proj,v_proj", "--data", files["data"], "--batch",
                           "8", "--steps", "2", "--every", "1", "--out", tmp_path / "out", timeout=120)
    assert done.returncode == 0, done.stderr
    tokenizer.eos_token = None
    tokenizer.save_pretrained(folder)
    refused(adapeft_command("probe", "--model", folder, "--lora", "q_proj", "--data", files["data"]),
            f"--model {folder}: its tokenizer has neither a padding token nor an end-of-text token")


def test_select_does_not_overwrite_the_record_it_reads(tmp_path):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_record()))
    for out in (path, tmp_path / "." / "probe.json"):
        done = refused(adapeft_command("select", "--probe", path, "--budget", "0.1", "--out", out),
                       f"--out {out} is the --probe record")
        assert done.count("\n") == 1
    assert json.loads(path.read_text()) == probe_record()


def test_a_command_run_with_stdout_closed_ends_as_with_it_open(tmp_path):
    """`adapeft select ... >&-`: Python has no sys.stdout; the results are not shown, and the command ends with
    status 0, without a traceback."""
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_record()))
    done = subprocess.run([sys.executable, "-m", "adapeft", "select", "--probe", str(path), "--budget", "0.1",
                           "--out", str(tmp_path / "selection.json")], stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: os.close(1), timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert adapeft.Selection.load(tmp_path / "selection.json").chosen == ["head", "norm"]


def test_the_classification_demo_refuses_a_model_other_than_a_bert(files, tmp_path):
    """BertForSequenceClassification loads another model's folder as random BERT weights, with a warning only."""
    folder = tiny_llama(tmp_path / "llama")
    shutil.copy(files["model"] / "vocab.txt", folder)
    started = time.perf_counter()
    refused(adapeft_command("demo", "--model", folder, "--quick", "--out", tmp_path / "report"),
            f"--model {folder} is a 'llama' model, not the BERT the classification demo trains", "--task causal-lm")
    assert time.perf_counter() - started < FLAG_CHECK_SECONDS and not (tmp_path / "report").exists()
    (folder / "config.json").write_text("{oops")
    refused(adapeft_command("demo", "--model", folder, "--quick", "--out", tmp_path / "report"),
            f"--model {folder}: config.json is not JSON")


def test_a_classifier_saved_with_another_number_of_labels_gets_a_new_head(files, tmp_path):
    folder = tmp_path / "two-labels"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.BertForSequenceClassification.from_pretrained(files["model"], num_labels=2).save_pretrained(folder)
    shutil.copy(files["model"] / "vocab.txt", folder)
    done = adapeft_command("probe", "--model", folder, "--data", write_csv(tmp_path / "three.csv", ["a", "b", "c"] * 8),
                           "--batch", "8", "--steps", "1", "--out", tmp_path / "out", timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["format"] == "adapeft.probe/1"
