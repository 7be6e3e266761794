"""What the demo and the command line share: loading a Hugging Face model and tokenizer quietly and checked,
output folders and warnings, batching a tokenised set, a classifier's loss and accuracy, and a progress bar."""
import contextlib
import functools
import math
import os
import random
import statistics
import sys
import warnings

import numpy as np
import torch


class InputError(ValueError):
    """What the user gave (a folder, a file, a budget) cannot be used: the `adapeft` command prints the
    message, which names it, and exits with status 2 instead of a traceback."""


# Files a tokenizer's vocabulary comes in: transformers' fast tokenizers, WordPiece (BERT), byte-level BPE
# (GPT-2, RoBERTa), and SentencePiece (T5, XLNet, Llama). A folder with none of them still loads, as a
# tokenizer of special tokens only that maps every word to [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


# The files transformers loads a model folder's weights from (sharded checkpoints' parts end so too).
WEIGHT_FILES = (".safetensors", ".bin")
# What the commands tell to do with a --model folder of GGUF files and no config.json or weights.
GGUF_REMEDY = "give --task causal-lm --gguf-file {}"


def check_model_folder(path, flag="model folder", gguf_remedy=None):
    """InputError unless `path` is a Hugging Face model folder (one with config.json and weights). gguf_remedy:
    what the message tells to do with a folder that holds GGUF files instead (the command line's flags for
    them)."""
    if not os.path.isdir(path):
        raise InputError(f"{flag} {path} is a file, not a model folder" if os.path.exists(path) else
                         f"{flag} {path}: no such folder")
    files = os.listdir(path)
    gguf = sorted(name for name in files if name.endswith(".gguf"))
    hint = f"; it holds {', '.join(gguf)}: {gguf_remedy.format(gguf[0])}" if gguf and gguf_remedy else ""
    if "config.json" not in files:
        raise InputError(f"{flag} {path} is not a Hugging Face model folder (no config.json){hint}")
    # Checked here, before the data are read and tokenised: transformers finds out only when it loads the model.
    if not any(name.endswith(WEIGHT_FILES) for name in files):
        remedy = hint or f"; save the model there with model.save_pretrained({path!r})"
        raise InputError(f"{flag} {path} has a config.json but no weight files (looked for "
                         f"{', '.join('*' + end for end in WEIGHT_FILES)}){remedy}")


def check_tokenizer_files(folder, flag="model folder", remedy=""):
    """InputError unless `folder` holds one of TOKENIZER_FILES; `remedy` ends the message."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise InputError(f"{flag} {folder} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); "
                         "without them every word would become [UNK]. Save the model's tokenizer there with "
                         f"tokenizer.save_pretrained({folder!r}){remedy}")


def prepare_output_folder(path, flag):
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


def tell(command, message):
    """A line of the `adapeft` command `command` on stderr, where it keeps its reports (stdout is for its results)."""
    Progress.write(f"adapeft {command}: {message}")


def warn(command, message):
    """A warning of the `adapeft` command `command`, one line on stderr."""
    tell(command, f"warning: {message}")


def duration(seconds):
    """A wall time as a person reads it: "8.4 s", "3 min 20 s", "6 h 12 min"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def load_tokenizer(source, flag="tokenizer", **options):
    """AutoTokenizer.from_pretrained(source, **options), refused (InputError) when it knows nothing but its
    special tokens: transformers builds such a tokenizer from files that hold no vocabulary."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    special = set(tokenizer.all_special_ids)
    if len(tokenizer) <= len(special):
        raise InputError(f"{flag} {source}: its tokenizer knows only its {len(special)} special tokens "
                         f"({', '.join(tokenizer.all_special_tokens)}), so every word would become "
                         f"{tokenizer.unk_token}; its files hold no vocabulary")
    return tokenizer


def load_pretrained(model_class, folder, **options):
    """`model_class.from_pretrained(folder, **options)` without transformers' loading report and progress
    bar, which are shown only at transformers' info verbosity (`adapeft --verbose`, TRANSFORMERS_VERBOSITY=info):
    a new task head is expected, not news. Weights of the model body missing from the checkpoint are news,
    and get one warning."""
    from transformers.utils import logging as hf_logging
    verbosity, progress_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    quiet = verbosity > hf_logging.INFO
    if quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), _gguf_bar_hidden(quiet and "gguf_file" in options):
            if quiet:
                warnings.simplefilter("ignore")
            model, info = model_class.from_pretrained(folder, output_loading_info=True, **options)
    except OSError as error:  # transformers' word for weights it cannot find or read, such as an index's missing part
        where = f"--gguf-file {options['gguf_file']} in --model {folder}" if "gguf_file" in options else \
            f"--model {folder}"
        raise InputError(f"{where}: transformers could not load the model: {error}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()
    body = model.base_model_prefix + "."
    random_body = sorted(key for key in info["missing_keys"] if key.startswith(body))
    if random_body and quiet:
        warnings.warn(f"adapeft: {len(random_body)} weights of the model body are not in {folder} and start from "
                      f"random values: {', '.join(random_body[:4])}{', ...' if len(random_body) > 4 else ''}",
                      UserWarning, stacklevel=2)
    return model


CAUSAL_LM_REMEDY = ("give a causal language model (llama, qwen2, gpt2, ...), or leave --task at classification to "
                    "train a classifier")


def load_causal_lm(folder, gguf_file=None, **options):
    """load_pretrained(AutoModelForCausalLM, folder, ...), refused (InputError naming --task and --model) where the
    model does not predict each token from those before it alone: a model type transformers has no causal LM of
    (found before loading), or an encoder that has one, such as BERT's LM head class, which attends both ways
    unless its config says is_decoder (found once loaded: GPT-NeoX's config says is_decoder false and it is
    causal, so the config alone does not tell)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(folder, **gguf)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(f"--task causal-lm: --model {folder} is a {config.model_type!r} model, of which transformers "
                         f"has no causal language model; {CAUSAL_LM_REMEDY}")
    model = load_pretrained(AutoModelForCausalLM, folder, config=config, **gguf, **options)
    if _sees_later_tokens(model):
        decoder = f", is_decoder {config.is_decoder}" if hasattr(config, "is_decoder") else ""
        raise InputError(f"--task causal-lm: --model {folder} is an encoder (model_type {config.model_type!r}"
                         f"{decoder}): its output at a position depends on the tokens after it, so its next-token "
                         f"loss would be read off the answer; {CAUSAL_LM_REMEDY}")
    return model


def embedding_rows(model):
    """The rows of a model's input embedding (through peft's LoRA wrapper of it, which has no num_embeddings)."""
    return model.get_input_embeddings().weight.shape[0]


@torch.no_grad()
def _sees_later_tokens(model):
    """Whether a model's outputs at a sequence's first positions change with its last token (from_pretrained leaves
    it in eval mode: no dropout)."""
    sequences = torch.tensor([[0, 1, 2], [0, 1, 3]], device=model.device) % embedding_rows(model)
    first, second = (model(input_ids=ids[None]).logits[0, :2].float() for ids in sequences)
    return bool((first - second).abs().max() > 1e-3 * first.abs().max())


@contextlib.contextmanager
def _gguf_bar_hidden(hide):
    """transformers' bar over a GGUF file's tensors as it de-quantises them, hidden where `hide`: it makes its tqdm
    bar itself, past the switch of transformers' other bars."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_loading
    except ImportError:
        hide = False
    bar = getattr(gguf_loading, "tqdm", None) if hide else None
    if bar is None:
        yield
        return
    gguf_loading.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_loading.tqdm = bar


def batches(data, size, seed, device):
    """Shuffled epochs, forever, in a fixed order for a seed: batches of `size` rows, an epoch's last
    partial batch dropped so that every batch has the same shape; data with fewer rows than `size` gives
    batches of all its rows."""
    rows = len(next(iter(data.values())))
    if rows < 1:
        raise ValueError("adapeft.apps.common.batches: the data has no rows")
    if size < 1:
        raise ValueError(f"adapeft.apps.common.batches: size must be a positive number of rows, got {size!r}")
    return _epochs(data, rows, min(size, rows), torch.Generator().manual_seed(seed), device)


def _epochs(data, rows, size, generator, device):
    while True:
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows - size + 1, size):
            index = order[start:start + size]
            yield {k: v[index].to(device) for k, v in data.items()}


def token_rows(tokenizer, texts, length, where="the text"):
    """The texts tokenised, each ended by the end-of-text token where the tokenizer has one, joined and cut
    into rows of `length` tokens (a LongTensor, rows x length; the tail shorter than a row is left out)."""
    ids = []
    for text in texts:
        # verbose=False: transformers warns of a text longer than the model's context "will result in indexing
        # errors", which the rows below, cut to `length`, do not
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    rows = len(ids) // length
    if rows < 1:
        raise InputError(f"--data {where} holds {len(ids)} tokens, fewer than one sequence of --max-length {length}; "
                         "give more text or a shorter --max-length")
    return torch.tensor(ids[:rows * length], dtype=torch.long).reshape(rows, length)


def loss_fn(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])


@torch.no_grad()
def evaluate(model, data, device, size=64):
    model.eval()
    correct, total_loss, n = 0, 0.0, data["labels"].numel()
    for start in range(0, n, size):
        batch = {k: v[start:start + size].to(device) for k, v in data.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        total_loss += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    model.train()
    return {"accuracy": correct / n, "loss": total_loss / n}


def prefix_record(prober):
    """What prefix reuse kept and saved, for a record (None where it was not asked for)."""
    prefix = prober.prefix
    if prefix is None:
        return None
    return {"blocks": len(prefix.blocks) if prefix.blocks else 0, "kept_boundaries": list(prefix.kept),
            "kept_bytes": prefix.nbytes, "block_share": prefix.block_share(), "disabled": prefix.disabled}


# Two-sided 95% quantiles of Student's t for 1 to 10 degrees of freedom; past 10, the normal's 1.96 (the
# error of the interval's width is then under 12%).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def paired_difference(accuracy, reference):
    """Mean and 95% confidence half-width of accuracy - reference, paired by seed (nan half-width for one)."""
    differences = [a - b for a, b in zip(accuracy, reference)]
    mean = statistics.mean(differences)
    if len(differences) < 2:
        return mean, math.nan
    t = T_975[len(differences) - 2] if len(differences) - 1 <= len(T_975) else 1.96
    return mean, t * statistics.stdev(differences) / math.sqrt(len(differences))


class Progress:
    """A tqdm bar on a terminal where tqdm is there (it comes with transformers), else on a terminal a line every
    tenth of the way. Nothing in a log file or a pipe, where a bar's redraws make no lines and the messages written
    above it land inside them: the commands' own lines say how a run goes there."""

    def __init__(self, total, description):
        self.bar, self.total, self.description = None, total, description
        self.shown = sys.stderr.isatty()
        if self.shown:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)

    def __call__(self, step, loss):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")
        elif self.shown and (step + 1) % max(1, self.total // 10) == 0:
            print(f"  {self.description}: step {step + 1}/{self.total}, loss {loss:.3f}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    @staticmethod
    def write(text):
        """`text` on stderr, above a running bar rather than in the middle of its line."""
        try:
            from tqdm.auto import tqdm
        except ImportError:
            print(text, file=sys.stderr)
        else:
            tqdm.write(text, file=sys.stderr)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
