"""A prober's measurement captured as one CUDA graph and replayed while nothing it depends on moved."""
import warnings

import torch


class GraphedMeasurement:
    """A prober's measurement captured as one CUDA graph, replayed while nothing it depends on moved.

    The first step with a new key runs eagerly on the capture stream (the warm-up PyTorch needs before a
    capture, and that step's result), then captures. Capture runs no kernel, so a failed capture leaves
    the model as it was; the groups' bookkeeping is put back either way. passes(): the forward passes counted so
    far (ProbeLoss.forward_passes); `uncounted_passes`: those the replays ran less those the captures counted.
    """

    def __init__(self, device, passes):
        self.device, self.passes = device, passes
        self.uncounted_passes = self._passes_per_replay = 0
        self.stream = torch.cuda.Stream(device)
        self.key = self.graph = self.static = None
        self.disabled = None
        self.captures = 0

    def _key(self, batch, perturbations, modules):
        leaves, spec = torch.utils._pytree.tree_flatten(batch)
        batch_key = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.device != self.device:
                    return None, f"the batch holds a tensor on {leaf.device}, not on {self.device}"
                batch_key.append((tuple(leaf.shape), leaf.stride(), leaf.dtype))
            else:
                try:
                    hash(leaf)
                except TypeError:
                    return None, f"the batch holds an unhashable {type(leaf).__name__}"
                batch_key.append(("value", leaf))
        # Where every parameter and buffer lives, read from each module's own tables (model.parameters()
        # would walk the modules again).
        tensors = tuple(t.data_ptr() for module in modules for table in (module._parameters, module._buffers)
                        for t in table.values() if t is not None)
        groups = tuple((name, group.fingerprint, group.table.data_ptr(), group.hyper.data_ptr(),
                        tuple(ledger.data_ptr() for ledger in group.ledgers))
                       for name, group in perturbations.items())
        return (str(spec), tuple(batch_key), tensors, groups), None

    def run(self, batch, perturbations, modules, measure):
        """Measure with the graph (capturing it first when needed; measure(batch) measures eagerly with
        `perturbations`); False: measure eagerly instead."""
        if self.disabled:
            return False
        key, why = self._key(batch, perturbations, modules)
        if key is None:
            self._disable(why)
            return False
        if key == self.key:
            leaves = torch.utils._pytree.tree_leaves(batch)
            for static, leaf in zip(self.static, leaves):
                if isinstance(leaf, torch.Tensor):
                    static.copy_(leaf)
            self.graph.replay()
            self.uncounted_passes += self._passes_per_replay
            return True
        self.key = self.graph = self.static = None  # free the old graph's memory before the new capture
        static_batch = torch.utils._pytree.tree_map(
            lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf, batch)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                measure(static_batch)
        finally:
            current.wait_stream(self.stream)  # also the restore that follows a failed loss_fn
        positions = {name: group.state for name, group in perturbations.items()}
        graph = torch.cuda.CUDAGraph()
        counted = self.passes()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                measure(static_batch)
        except Exception as error:  # noqa: BLE001 - whatever stops the capture, the probe goes on eagerly
            self._repair_generator()
            self._disable(f"capturing the forward passes failed ({type(error).__name__}: {error})")
            return True  # this step was measured by the warm-up
        finally:
            for name, group in perturbations.items():
                group.state = positions[name]
            self._passes_per_replay = self.passes() - counted
            self.uncounted_passes -= self._passes_per_replay  # a capture runs nothing
        self.key, self.graph = key, graph
        self.captures += 1
        self.static = [leaf for leaf in torch.utils._pytree.tree_leaves(static_batch)]
        return True

    def _repair_generator(self):
        """A capture that fails leaves the device's default generator marked as capturing (PyTorch ends that
        mark only at a successful capture's end), and every later random op on the device would fail; one
        small successful capture clears it."""
        scratch = torch.zeros(1, device=self.device)
        repair = torch.cuda.CUDAGraph()
        with torch.cuda.graph(repair, stream=self.stream):
            scratch.add_(1)
        del repair

    def _disable(self, why):
        self.disabled = why
        self.key = self.graph = self.static = None
        warnings.warn(f"adapeft.Prober: cuda_graph=True: {why}; probing eagerly from now on", UserWarning,
                      stacklevel=4)
