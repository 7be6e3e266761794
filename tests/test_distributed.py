"""Probing under torch.distributed: DDP and FSDP2 on 2 processes, on CPU (gloo) and, where there are two
GPUs, on one GPU each (NCCL), against one CPU process on the global batch."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import adapeft
from adapeft.ops import backend as _backend

pytestmark = [
    pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]
WORLD = 2
ETA = 1e-3
BACKENDS = [pytest.param("gloo", id="gloo"),
            pytest.param("nccl", id="nccl", marks=pytest.mark.skipif(
                not (torch.cuda.device_count() >= WORLD and dist.is_nccl_available()), reason="needs 2 GPUs and NCCL"))]


def make_model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(),
                               torch.nn.Dropout(0.1), torch.nn.Linear(32, 4)).double().to(device)


def global_batch(device="cpu"):
    generator = torch.Generator().manual_seed(1)
    inputs, labels = torch.randn(64, 8, dtype=torch.float64, generator=generator), torch.randint(0, 4, (64,), generator=generator)
    return inputs.to(device), labels.to(device)


def join(rank, folder, backend):
    """Joins the 2-process group; returns this rank's device and its half of the global batch."""
    dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    inputs, labels = global_batch(device)
    share = inputs.shape[0] // WORLD
    return device, (inputs[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share])


def cross_entropy(model, batch):
    inputs, labels = batch
    return torch.nn.functional.cross_entropy(model(inputs), labels)


def probe_twice(model, batch):
    model.eval()  # no dropout: the ranks' gradients are the global batch's
    cross_entropy(model, batch).backward()
    prober = adapeft.Prober(model, None, cross_entropy)
    results = [prober.step(batch, ETA) for _ in range(2)]
    return prober, results


def summary(prober, results, model):
    selection = adapeft.select(prober, budget=0.5, method="exact")
    return {"names": prober.names, "counts": prober.groups.numel,
            "b": torch.stack([r.b for r in results]), "A": torch.stack([r.A for r in results]),
            "losses": torch.stack([r.losses for r in results]), "appi": prober.appi.clone(),
            "accepted": torch.stack([r.accepted for r in results]),
            "chosen": selection.chosen,
            "weights": [p.detach().clone() for p in model.parameters()]}


def ddp_worker(rank, folder, backend):
    device, local = join(rank, folder, backend)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model(device))
        before = [p.detach().clone() for p in model.parameters()]
        prober, results = probe_twice(model, local)
        out = summary(prober, results, model)
        out["plain_b"] = adapeft.Prober(model, None, cross_entropy, backend="torch").step(local, ETA).b
        out["restored"] = all(torch.equal(a.view(torch.int64), b.detach().view(torch.int64))
                              for a, b in zip(before, model.parameters()))
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def fsdp2_worker(rank, folder, backend):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    device, local = join(rank, folder, backend)
    try:
        model = make_model(device)
        fully_shard(model, mesh=init_device_mesh(device.type, (WORLD,)))
        before = [p.detach().to_local().clone() for p in model.parameters()]
        prober, results = probe_twice(model, local)
        out = summary(prober, results, model)
        # the prober leaves no gathered (possibly perturbed) parameters behind: they are DTensors again
        out["restored"] = all(torch.equal(a.view(torch.int64), b.detach().to_local().view(torch.int64))
                              for a, b in zip(before, model.parameters()))
        out["weights"] = [p.detach().full_tensor() for p in model.parameters()]
        calls = {"n": 0}

        def failing(model, batch):
            calls["n"] += 1
            if calls["n"] == 6:  # mid-way, with the second group's shards moved
                raise ValueError("interrupted")
            return cross_entropy(model, batch)

        try:
            adapeft.Prober(model, None, failing).step(local, ETA)
        except RuntimeError as error:
            out["failure"] = "interrupted" in str(error)
        out["restored"] &= all(torch.equal(a.view(torch.int64), b.detach().to_local().view(torch.int64))
                               for a, b in zip(before, model.parameters()))
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("worker", [ddp_worker, fsdp2_worker], ids=["DDP", "FSDP2"])
def test_ranks_agree_with_one_process_on_the_global_batch(tmp_path, worker, backend):
    mp.spawn(worker, args=(str(tmp_path), backend), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", map_location="cpu") for r in range(WORLD)]
    model = make_model()
    prober, results = probe_twice(model, global_batch())
    single = summary(prober, results, model)
    for out in ranks:
        assert out["restored"] and out.get("failure", True)
        assert out["names"] == single["names"] and out["counts"] == single["counts"]
        # every rank fits the same numbers: bit-identical across ranks
        for key in ("b", "A", "losses", "appi"):
            assert torch.equal(out[key], ranks[0][key]), key
        for mine, theirs in zip(out["weights"], ranks[0]["weights"]):
            assert torch.equal(mine, theirs)
        # and the global batch's numbers, up to float64 reduction order (the mean of two half-batch means,
        # gradients averaged by DDP's buckets, GPU kernels against CPU ones)
        torch.testing.assert_close(out["losses"], single["losses"], rtol=1e-13, atol=0)
        # b and A are first and second differences of those losses over steps of eta, so a loss error
        # delta moves b by up to about delta / eta and A by delta / eta^2: a group whose loss barely moves
        # has b and A known only to a large relative error, and so has its APPI ~ b^2 / A.
        delta = 1e-13 * float(single["losses"].abs().max())
        b_error, a_error = 10 * delta / ETA, 10 * delta / ETA ** 2
        torch.testing.assert_close(out["b"], single["b"], rtol=1e-7, atol=b_error)
        torch.testing.assert_close(out["A"], single["A"], rtol=1e-7, atol=a_error)
        assert torch.equal(out["accepted"], single["accepted"])
        relative = torch.where(single["accepted"], 2 * b_error / single["b"].abs() + a_error / single["A"].abs(), 0.0)
        allowed = single["appi"] * (relative.amax(0) + 1e-7)
        assert ((out["appi"] - single["appi"]).abs() <= allowed).all(), (out["appi"], single["appi"], allowed)
        assert out["chosen"] == single["chosen"]
        if "plain_b" in out:  # the plain PyTorch backend averages the same way
            torch.testing.assert_close(out["plain_b"].cpu(), single["b"][-1], rtol=1e-7, atol=b_error)


def squared_gradient_phase_worker(rank, folder, backend, sharding):
    """A callback's probing phase, one probe on this rank's half of the global batch: its record's |g|^2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from adapeft.phase import ProbingPhase
    device, local = join(rank, folder, backend)
    try:
        model = make_model(device)
        if sharding == "FSDP2":
            fully_shard(model, mesh=init_device_mesh(device.type, (WORLD,)))
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
        model.eval()  # no dropout: the ranks' gradients are the global batch's
        cross_entropy(model, local).backward()
        phase = ProbingPhase("test", 0.5, "exact", 1.0, 1, ETA, "grad", "type", None, False)
        phase.begin(model, 1)
        assert phase.probe(model, cross_entropy, local, None, ETA) is not None
        phase.finish(os.path.join(folder, "out"), rank == 0)
        torch.save(phase.squared_gradient, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sharding", ["DDP", "FSDP2"])
def test_the_callbacks_record_keeps_the_whole_tensors_squared_gradients(tmp_path, backend, sharding):
    """Under FSDP2 each rank holds shards of the gradients: the record's |g|^2 a group is the whole tensors' (the
    shards' squares summed over the ranks), as one process on the global batch has it, on every rank."""
    mp.spawn(squared_gradient_phase_worker, args=(str(tmp_path), backend, sharding), nprocs=WORLD, join=True)
    model = make_model().eval()
    cross_entropy(model, global_batch()).backward()
    groups = adapeft.group_parameters(model)
    single = torch.tensor([sum(float(p.grad.square().sum()) for p in groups.params(name)) for name in groups.names],
                          dtype=torch.float64)
    for rank in range(WORLD):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), single, rtol=1e-12, atol=0)
    record = json.loads((tmp_path / "out" / "adapeft_probe.json").read_text())
    assert record["groups"] == groups.names and record["probe_history"][0]["eta"] == ETA
    torch.testing.assert_close(torch.tensor(record["squared_gradient"], dtype=torch.float64), single, rtol=1e-12,
                               atol=0)


def test_process_group_checks():
    model = make_model()
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        adapeft.Prober(model, None, cross_entropy, process_group=object())
    assert adapeft.Prober(model, None, cross_entropy).process_group is None


def train_tiny_bert(callback, output_dir, **settings):
    """Trains a tiny BERT classifier with LoRA for 8 steps under `callback`, with TrainingArguments `settings`; the
    Trainer."""
    import warnings

    import transformers

    from adapeft.algorithm import equip_lora
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = equip_lora(transformers.BertForSequenceClassification(transformers.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=97,
            num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)), ["query", "value"], r=4)
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randint(0, 97, (64, 12), generator=generator), torch.randint(0, 3, (64,), generator=generator)
    data = [{"input_ids": x, "labels": y} for x, y in zip(inputs, labels)]
    args = transformers.TrainingArguments(output_dir=output_dir, max_steps=8, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", disable_tqdm=True,
                                          **settings)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    callback.attach(trainer)
    trainer.train()
    return trainer


def trainer_worker(rank, folder, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from adapeft.hf import AdaPEFTCallback
    callback = AdaPEFTCallback(budget=0.05, probe_fraction=0.5, every=2)
    train_tiny_bert(callback, os.path.join(folder, "out"), use_cpu=True, ddp_backend="gloo")
    torch.save({"world": dist.get_world_size(), "appi": callback.prober.appi.clone(),
                "chosen": callback.selection.chosen, "probes": len(callback.prober.history)},
               os.path.join(folder, f"rank{rank}.pt"))


def test_trainer_callback_under_ddp_agrees_across_ranks(tmp_path):
    import socket
    with socket.socket() as probe_port:
        probe_port.bind(("127.0.0.1", 0))
        port = probe_port.getsockname()[1]
    mp.spawn(trainer_worker, args=(str(tmp_path), port), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(out["world"] == WORLD and out["probes"] >= 2 for out in ranks)
    assert torch.equal(ranks[0]["appi"], ranks[1]["appi"]) and ranks[0]["chosen"] == ranks[1]["chosen"]
    assert (tmp_path / "out" / "adapeft_selection.json").exists()  # written once, by rank 0


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.linear = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)

    def forward(self, hidden):
        return hidden + torch.tanh(self.linear(self.norm(hidden)))


class Stack(torch.nn.Module):
    """A model with a block stack, for prefix reuse under FSDP2 (a shard unit per block)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(3))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, inputs):
        hidden = self.embed(inputs)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden)


def fsdp2_prefix_worker(rank, folder, backend, meshes):
    """meshes "one": every fully_shard call on one DeviceMesh; "per call": none given, so each call makes its own
    default mesh of the world, as accelerate (Trainer's fsdp settings) calls it: equal meshes, distinct objects."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    device, local = join(rank, folder, backend)
    try:
        torch.manual_seed(0)
        model = Stack().double().to(device)
        mesh = {"mesh": init_device_mesh(device.type, (WORLD,))} if meshes == "one" else {}
        for block in model.blocks:
            fully_shard(block, **mesh)
        fully_shard(model, **mesh)
        if meshes == "per call":
            assert len({id(p.device_mesh) for p in model.parameters()}) > 1
        cross_entropy(model, local).backward()
        groups = adapeft.group_parameters(model, "layer")
        out = {}
        for reuse in (False, True):
            prober = adapeft.Prober(model, groups, cross_entropy, reuse_prefix=reuse)
            out[reuse] = torch.stack([prober.step(local, ETA).losses for _ in range(2)])
        out["kept"], out["share"] = prober.prefix.kept, prober.prefix.block_share()
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("meshes", ["one", "per call"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_ranks_skip_the_same_blocks_and_measure_the_same_losses(tmp_path, backend, meshes):
    mp.spawn(fsdp2_prefix_worker, args=(str(tmp_path), backend, meshes), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", map_location="cpu") for r in range(WORLD)]
    for out in ranks:
        assert torch.equal(out[True].view(torch.int64), out[False].view(torch.int64))
        assert torch.equal(out[True].view(torch.int64), ranks[0][True].view(torch.int64))
        assert out["kept"] == (1, 2, 3) and out["share"] < 0.7


def fsdp2_unsupported_worker(rank, folder):
    from torch.distributed.fsdp import fully_shard
    join(rank, folder, "gloo")
    try:
        model = Stack().double()
        for block in model.blocks:
            fully_shard(block)  # the embedding and head stay plain tensors
        groups = adapeft.group_parameters(model, "layer")
        try:
            adapeft.Prober(model, groups, cross_entropy)
            message = None
        except NotImplementedError as error:
            message = str(error)
        torch.save(message, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_with_plain_tensors_beside_shards_is_refused_saying_so(tmp_path):
    mp.spawn(fsdp2_unsupported_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        assert torch.load(tmp_path / f"rank{rank}.pt") == (
            "adapeft.Prober: parameters sharded over one 1-D device mesh (FSDP2's fully_shard) are supported; in this "
            "model 4 of its 16 parameters are plain tensors beside sharded ones")


TRAINER_FSDP2 = '''
import json, sys
sys.path.insert(0, sys.argv[4])
from adapeft.hf import AdaPEFTCallback
from test_distributed import train_tiny_bert

mode, out, folder = sys.argv[1:4]
callback = AdaPEFTCallback(budget=0.05, probe_fraction=0.5, every=2, direction="grad")
fsdp = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]})
trainer = train_tiny_bert(callback, folder, **(fsdp if mode == "fsdp" else {}))
sharded = sum(type(p).__name__ == "DTensor" for p in trainer.model_wrapped.parameters())
json.dump({"sharded": sharded, "appi": callback.prober.appi.tolist(), "chosen": callback.selection.chosen,
           "probes": len(callback.prober.history)}, open(out, "w"))
'''


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Trainer applies its fsdp settings on GPUs only")
def test_trainer_callback_under_trainers_own_fsdp2_settings_on_cuda(tmp_path):
    """Trainer's fsdp settings (accelerate's fully_shard, one default mesh a call), one process on one GPU: the
    callback probes the sharded model and chooses as it does without FSDP."""
    import subprocess
    import sys
    script = tmp_path / "train.py"
    script.write_text(TRAINER_FSDP2)
    found = {}
    for mode in ("fsdp", "plain"):
        out = tmp_path / f"{mode}.json"
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(script),
                               mode, str(out), str(tmp_path / mode), os.path.dirname(__file__)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        found[mode] = json.loads(out.read_text())
    assert found["fsdp"]["sharded"] > 0 and found["plain"]["sharded"] == 0
    assert found["fsdp"]["probes"] == found["plain"]["probes"] == 2  # steps 0 and 2 of the 4-step phase
    assert found["fsdp"]["chosen"] == found["plain"]["chosen"]
    torch.testing.assert_close(torch.tensor(found["fsdp"]["appi"]), torch.tensor(found["plain"]["appi"]), rtol=1e-5,
                               atol=0)
