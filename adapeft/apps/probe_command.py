"""`adapeft probe`: train a model on the user's data for a few steps, probing every group on schedule, and
write the record (probe.json) that `adapeft select` and `adapeft plot` read.

Two tasks: a sequence classifier (a table of texts and labels; the new head and LoRA on --lora trained with the
whole model), and a causal language model (text; LoRA on every linear layer of its blocks, or on --lora, and
only LoRA trained, each adapter a group: "self_attn.q_proj@3"). Every input is checked before a model is loaded.
"""
import json
import math
import os
import statistics
import time

import torch

from ..record import probe_record
from ..steps import BRACKET_ROUNDS
from . import common
from .common import InputError
from .inputs import json_error, label_warnings, read_table, read_texts

TASKS = ("classification", "causal-lm")
DEFAULT_GRANULARITY = {"classification": "type", "causal-lm": "module"}
DEFAULT_LORA = {"classification": ("query", "value"), "causal-lm": None}  # None: every linear layer of the blocks
DEFAULT_LR = {"classification": 5e-5, "causal-lm": 3e-4}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LONG_PROBE_SECONDS = 600  # a probe estimated to take longer is told the flags that make it quicker
TIMED_PASSES = 5  # the probe's first forward passes that its estimate times, the first of them (a warm-up) left out
# A first look at a causal LM in minutes on a CPU, where the defaults would take hours: `adapeft probe --help` and the
# README give it, timed on SmolLM2-135M-Instruct (2 CPU cores, 2026-12-07).
QUICK_CAUSAL_LM = {"--granularity": "layer", "--steps": 8, "--batch": 4, "--max-length": 32}


def run(args):
    if args.points == 3 and args.slope != "autograd":
        raise InputError("--points 3 needs --slope autograd: three points fit the curvature through the exact slope")
    if args.gguf_file is not None and args.task != "causal-lm":
        raise InputError("--gguf-file: a GGUF file holds a causal language model; give --task causal-lm too")
    if args.task == "causal-lm" and args.max_length < 2:
        raise InputError(f"--max-length {args.max_length}: a causal LM's next-token loss needs sequences of 2 tokens "
                         "at least")
    _check_model(args)
    if args.task == "classification":
        texts, labels = read_table(args.data, args.text_column, args.label_column)
        for warning in label_warnings(labels, args.batch, args.data, args.label_column):
            common.warn(args.command, warning)
    else:
        texts, labels = read_texts(args.data, args.text_column), None
    source, options = _tokenizer_source(args)
    common.prepare_output_folder(args.out, "--out")

    from .. import signals
    from ..algorithm import AdaPEFT
    from ..groups import group_parameters
    from ..llm import ADAPTER_UNITS, adapter_groups
    flag = "--tokenizer" if args.tokenizer else "--gguf-file" if args.gguf_file else "--model"
    tokenizer = _load_tokenizer(source, flag, options)
    if args.task == "classification" and tokenizer.pad_token is None:
        # A decoder's tokenizer (GPT-2's, Llama's) has no padding token: its end-of-text token pads, masked out.
        if tokenizer.eos_token is None:
            raise InputError(f"{flag} {source}: its tokenizer has neither a padding token nor an end-of-text token "
                             f"to pad the texts to --max-length with")
        tokenizer.pad_token = tokenizer.eos_token
    common.seed_everything(args.seed)
    if args.task == "classification":
        model, data, loss_fn = _classifier(args, tokenizer, texts, labels)
    else:
        model, data, loss_fn = _causal_lm(args, tokenizer, texts)
    rows = common.embedding_rows(model)
    if len(tokenizer) > rows:
        raise InputError(f"{flag} {source}: its tokenizer has {len(tokenizer)} tokens, but the embeddings of --model "
                         f"{args.model} have {rows} rows; use the tokenizer the model was trained with")
    run_on = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(run_on, DTYPES[args.dtype])
    granularity = args.granularity or DEFAULT_GRANULARITY[args.task]
    if args.task == "causal-lm" and granularity in ADAPTER_UNITS:
        # Units that hold both factors of their adapters, as the LoraConfig that `adapeft select` prints trains them.
        groups = adapter_groups(model, granularity)
    else:
        if args.task == "causal-lm":
            common.warn(args.command, f"--granularity {granularity}: its groups hold one LoRA factor each, but the "
                                      "LoraConfig `adapeft select` prints trains both factors of a chosen adapter, so "
                                      f"it trains more than the count chosen; --granularity {' or '.join(ADAPTER_UNITS)}"
                                      " keeps an adapter's factors together")
        # A causal LM trains its adapters only: the frozen base is no group (its counts would swamp any budget).
        groups = group_parameters(model, granularity=granularity, trainable_only=args.task == "causal-lm")
    # LoRA's factors probed apart (together, their product's cross term bends the curvature negative), chosen
    # together: a no-op where the granularity already keeps them apart.
    parts = groups.split_factors()
    lr = args.lr or DEFAULT_LR[args.task]
    algorithm = AdaPEFT(probe_every=args.every, eta=args.eta, slope=args.slope, compute=args.compute,
                        direction=args.direction, points=args.points, reuse_prefix=args.reuse_prefix)
    progress = common.Progress(args.steps, "probe")
    clock = ProbeClock(args, len(groups), len(parts), progress)
    # The free signal beside the probe's values: the training gradient's |g|^2 a unit at every probe step.
    squared_gradient = torch.zeros(len(groups.names), dtype=torch.float64)

    def after_probe(batch):
        squared_gradient.add_(signals.squared_gradient(groups))
        clock.after_probe(batch)

    probe_run = algorithm.probe_train(model, common.batches(data, args.batch, args.seed, run_on), clock.timed(loss_fn),
                                      args.steps, lr, on_step=clock.after_step, on_probe=after_probe, groups=parts)
    progress.close()
    prober = probe_run.prober
    prober.flush()
    record = {"format": "adapeft.probe/1", "task": args.task, "model": args.model, "granularity": granularity,
              "direction": args.direction, "lr": lr, "points": args.points, "slope": args.slope,
              # the rest of the run's settings, to repeat it
              "data": args.data, "dtype": args.dtype, "compute": args.compute, "batch": args.batch,
              "max_length": args.max_length, "steps": args.steps, "every": args.every, "eta": args.eta,
              "seed": args.seed, "reuse_prefix": args.reuse_prefix,
              "forward_passes": prober.forward_passes, "backward_passes": prober.backward_passes,
              **probe_record(prober, groups, squared_gradient), "prefix": common.prefix_record(prober)}
    if args.task == "causal-lm":
        record["lora_rank"] = args.lora_rank
        record["adapted_modules"] = {name: groups.adapted_modules(name) for name in groups.names}
    path = os.path.join(args.out, "probe.json")
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)
    print(groups.summary())
    probes = len(prober.history)
    print(f"probed {probes} time{'s' if probes > 1 else ''}; wrote {path}")


class ProbeClock:
    """What the run costs, on stderr, so that a long probe says so before its long part: at once, the forward passes
    the probes will run; after the probe's first TIMED_PASSES forward passes (whole passes), the wall time they take
    at their pace; with prefix reuse, after as many passes again as a probe runs (most of them shortened), the time
    left at their pace; after each probe, its seconds and the time left at the pace so far. `progress`: the steps'
    bar."""

    def __init__(self, args, units, parts, progress):
        self.command, self.progress, self.reuse_prefix = args.command, progress, args.reuse_prefix
        per_probe = (args.points - 1) * parts + 1  # each group's points but the unperturbed one, which all share
        probes = math.ceil(args.steps / args.every)  # at steps 0, every, 2 every, ...
        # A group's first probe starts with rounds of its points that only choose its step: all of them at the first.
        self.passes = [(1 + BRACKET_ROUNDS) * per_probe] + [per_probe] * (probes - 1)
        factors = f" (the {units} groups' LoRA A and B apart)" if parts != units else ""
        autograd = " and a backward pass" if args.slope == "autograd" else ""
        cheaper = "; --points 3 --slope autograd: 2K+1 and a backward pass" if args.points == 5 else ""
        check = " and the few whole passes that check prefix reuse's losses at the first probe" \
            if args.reuse_prefix else ""
        prefix = "on: each group's passes start at the first block that uses it" if args.reuse_prefix else \
            "off: every pass runs the whole model"
        common.tell(self.command, f"cost: {parts} groups probed{factors}, {per_probe} forward passes{autograd} a probe "
                                  f"({args.points - 1}K+1 for K groups{cheaper}), prefix reuse {prefix}; {probes} "
                                  f"probe{'s' if probes > 1 else ''} (--steps {args.steps}, --every {args.every}), the "
                                  f"first after {BRACKET_ROUNDS} rounds of {per_probe} passes that choose each group's "
                                  f"step: about {sum(self.passes)} forward passes in all, besides the training "
                                  f"steps{check}.")
        self.quicker = _quicker_flags(args)
        self.per_probe = per_probe
        self.pass_seconds = []
        self.probe_passes = 0  # eval-mode calls of loss_fn so far: the probe's forward passes
        self.paced_from = None  # when the first TIMED_PASSES passes ended
        self.probed = 0
        self.started = self.step_ended = time.perf_counter()

    def timed(self, loss_fn):
        """loss_fn, its first TIMED_PASSES calls in eval mode timed one by one (the probe runs loss_fn in eval mode,
        the training in train mode), and with prefix reuse the next per_probe calls timed together."""
        def loss(model, batch):
            if model.training:
                return loss_fn(model, batch)
            self.probe_passes += 1
            if len(self.pass_seconds) == TIMED_PASSES:
                value = loss_fn(model, batch)
                if self.reuse_prefix and self.probe_passes == TIMED_PASSES + self.per_probe:
                    self._synchronize(value)
                    self._pace()
                return value
            started = time.perf_counter()
            value = loss_fn(model, batch)
            self._synchronize(value)
            self.pass_seconds.append(time.perf_counter() - started)
            if len(self.pass_seconds) == TIMED_PASSES:
                self._estimate()
                self.paced_from = time.perf_counter()
            return value
        return loss

    @staticmethod
    def _synchronize(value):
        if value.is_cuda:
            torch.cuda.synchronize(value.device)  # the passes themselves, not their launches

    def _estimate(self):
        total = sum(self.passes)
        first, *warm = self.pass_seconds
        pace = statistics.median(warm)  # the first pass pays for warming up: seconds more, on a CPU, than the others
        seconds = total * pace
        # The first groups are used from the first block on, so these passes run the whole model, which the others
        # do too only without prefix reuse.
        whole = f"; with prefix reuse later groups' passes start at their first block and may take less (a line " \
                f"after {self.per_probe} more passes says)" if self.reuse_prefix else ""
        quicker = f" Quicker: {self.quicker} (see adapeft probe --help)." \
            if seconds > LONG_PROBE_SECONDS and self.quicker else ""
        common.tell(self.command, f"estimate: the probe's forward passes 2 to {TIMED_PASSES} took {pace:.3g} s each "
                                  f"(median; the first, a warm-up, {first:.3g} s), so its {total} passes take about "
                                  f"{common.duration(seconds)}{whole}; a line after each probe says how it goes."
                                  f"{quicker}")

    def _pace(self):
        total = sum(self.passes)
        pace = (time.perf_counter() - self.paced_from) / self.per_probe
        whole = statistics.median(self.pass_seconds[1:])
        left = max(total - self.probe_passes, 0)
        common.tell(self.command, f"pace: the probe's passes {TIMED_PASSES + 1} to {self.probe_passes} took "
                                  f"{pace:.3g} s each with prefix reuse and the probe's own work between them "
                                  f"({pace / whole:.0%} of a whole pass timed alone), so its other {left} passes take "
                                  f"about {common.duration(left * pace)}.")

    def after_step(self, step, loss):
        self.step_ended = time.perf_counter()
        self.progress(step, loss)

    def after_probe(self, batch):
        # From the end of the step before: the probe's seconds and its own training step's forward and backward.
        now = time.perf_counter()
        self.probed += 1
        done, left = sum(self.passes[:self.probed]), sum(self.passes[self.probed:])
        pace = (now - self.started) / done  # training steps included
        remaining = f"; about {common.duration(pace * left)} left" if left else ""
        common.tell(self.command, f"probe {self.probed} of {len(self.passes)}: {now - self.step_ended:.1f} s (with its "
                                  f"training step){remaining}")


def _quicker_flags(args):
    """The flags, with their values, that make this run cheaper: those of the quick setting (causal LMs) it does not
    already meet, and the three-point probe; "" where it has them all."""
    flags = []
    if args.task == "causal-lm":
        granularity = args.granularity or DEFAULT_GRANULARITY[args.task]
        if granularity != QUICK_CAUSAL_LM["--granularity"]:
            flags.append(f"--granularity {QUICK_CAUSAL_LM['--granularity']}")
        flags += [f"{flag} {value}" for flag, value in QUICK_CAUSAL_LM.items()
                  if flag != "--granularity" and getattr(args, flag[2:].replace("-", "_")) > value]
    if args.points == 5:
        flags.append("--points 3 --slope autograd")
    return " ".join(flags)


def _check_model(args):
    if args.gguf_file is None:
        common.check_model_folder(args.model, "--model", common.GGUF_REMEDY)
        positions, where = _positions(args.model), f"--model {args.model}"
    else:
        check_gguf_file(args.model, args.gguf_file)
        positions, where = _gguf_positions(os.path.join(args.model, args.gguf_file)), f"--gguf-file {args.gguf_file}"
    if positions is not None and args.max_length > positions:
        raise InputError(f"--max-length {args.max_length} is more than the {positions} positions of {where}; give at "
                         f"most {positions}")


def check_gguf_file(folder, name):
    """InputError unless the folder --model holds the file --gguf-file."""
    if not os.path.isdir(folder):
        raise InputError(f"--model {folder}: no such folder" if not os.path.exists(folder) else
                         f"--model {folder} is a file, not the folder that holds --gguf-file")
    if not os.path.isfile(os.path.join(folder, name)):
        found = sorted(entry for entry in os.listdir(folder) if entry.endswith(".gguf"))
        raise InputError(f"--gguf-file {name}: no such file in --model {folder} (GGUF files there: "
                         f"{', '.join(found) or 'none'})")


def _positions(folder):
    """The longest input the model folder's config allows, where it says (BERT's and GPT-2's key names)."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as error:
            raise InputError(f"--model {folder}: config.json is not JSON ({json_error(error)})") from None
    found = config.get("max_position_embeddings", config.get("n_positions")) if isinstance(config, dict) else None
    return found if isinstance(found, int) and found > 0 else None


def _gguf_positions(path):
    """The context length a GGUF file's metadata gives ("<architecture>.context_length"), where the gguf package is
    there to read it (transformers needs it to load the file anyway) and the file says."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        fields = GGUFReader(path).fields
        architecture = fields["general.architecture"].contents()
        return int(fields[f"{architecture}.context_length"].contents())
    except (KeyError, ValueError, OSError):
        return None


def _tokenizer_source(args):
    """(where the tokenizer comes from, options of from_pretrained): --tokenizer, else the --gguf-file, else the
    --model folder, checked for tokenizer files where it is a folder."""
    if args.tokenizer is None:
        if args.gguf_file is not None:
            return args.model, {"gguf_file": args.gguf_file}
        common.check_tokenizer_files(args.model, "--model", remedy=", or pass --tokenizer FOLDER_OR_NAME (a folder "
                                                                 "or Hugging Face Hub name of the model's tokenizer)")
        return args.model, {}
    if os.path.isdir(args.tokenizer):
        common.check_tokenizer_files(args.tokenizer, "--tokenizer")
    elif args.tokenizer.startswith((".", "/", "~")):
        raise InputError(f"--tokenizer {args.tokenizer}: no such folder")
    return args.tokenizer, {}


def _load_tokenizer(source, flag, options):
    try:
        return common.load_tokenizer(source, flag, **options)
    except InputError:
        raise
    except (OSError, ValueError) as error:  # transformers' word for files it cannot read or find
        raise InputError(f"{flag} {source}: transformers could not load a tokenizer from it: {error}") from None


def _with_lora(model, targets, flag_value, **options):
    from ..algorithm import check_lora_targets, equip_lora
    try:
        check_lora_targets(model, targets, owner=f"--lora {flag_value}")
    except ValueError as error:
        raise InputError(str(error)) from None
    try:
        return equip_lora(model, targets, **options)
    except ValueError as error:  # peft: a module it cannot adapt
        raise InputError(f"--lora {flag_value}: {error}") from None


def _classifier(args, tokenizer, texts, labels):
    from transformers import AutoModelForSequenceClassification
    classes = sorted(set(labels))
    # ignore_mismatched_sizes: a classifier saved with another number of labels gets a new head, as a body does.
    model = common.load_pretrained(AutoModelForSequenceClassification, args.model, num_labels=len(classes),
                                   ignore_mismatched_sizes=True)
    if model.config.pad_token_id is None:
        # A decoder's classifier reads each text's last token before the padding, found by the padding token's id.
        model.config.pad_token_id = tokenizer.pad_token_id
    targets = DEFAULT_LORA["classification"] if args.lora is None else args.lora
    if targets:
        model = _with_lora(model, targets, ",".join(targets), r=args.lora_rank, alpha=2 * args.lora_rank)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length,
                        return_tensors="pt")
    data = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor([classes.index(label) for label in labels])}
    return model, data, common.loss_fn


def _causal_lm(args, tokenizer, texts):
    from ..llm import causal_lm_loss, lora_targets
    if args.lora == ():
        raise InputError("--lora '': a causal language model is probed through LoRA adapters (its base stays "
                         "frozen); name the modules to adapt, or leave --lora out for every linear layer")
    data = {"input_ids": common.token_rows(tokenizer, texts, args.max_length, args.data)}
    rows = len(data["input_ids"])
    if rows < args.batch:
        common.warn(args.command, f"--batch {args.batch} is more than the {rows} sequences of {args.max_length} "
                                  f"tokens in {args.data}: every step trains and probes on all {rows}")
    model = common.load_causal_lm(args.model, args.gguf_file)
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and args.max_length > positions:
        raise InputError(f"--max-length {args.max_length} is more than the {positions} positions of --model "
                         f"{args.model}; give at most {positions}")
    targets = lora_targets(model) if args.lora is None else args.lora
    model = _with_lora(model, targets, ",".join(targets), r=args.lora_rank, alpha=2 * args.lora_rank,
                       train_all=False)
    return model, data, causal_lm_loss
