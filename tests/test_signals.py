"""The cheap signals of `adapeft demo --compare` against hand computations, and the comparison's bookkeeping."""
import math

import numpy as np
import pytest
import torch

import adapeft
from adapeft import signals
from adapeft.apps import common, demo


def softmax_regression(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Dropout(0.5)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    return model, (x, y)


def cross_entropy(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_squared_gradient_is_the_groups_sum_of_squares():
    model, batch = softmax_regression()
    cross_entropy(model, batch).backward()
    groups = adapeft.group_parameters(model)
    expected = [sum(float((p.grad ** 2).sum()) for p in groups.params(name)) for name in groups.names]
    assert signals.squared_gradient(groups).tolist() == pytest.approx(expected, rel=1e-15)


def test_empirical_fisher_matches_the_per_example_gradients_by_hand():
    """Softmax regression: the gradient of example i is (p_i - e_y) x_i^T for the weight and p_i - e_y for
    the bias, in eval mode (no dropout); p.grad and the training flags stay as they were."""
    model, (x, y) = softmax_regression()
    model.train()
    cross_entropy(model, (x, y)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    groups = adapeft.group_parameters(model)
    examples = [(x[i:i + 1], y[i:i + 1]) for i in range(len(y))]
    fisher = signals.empirical_fisher(model, groups, cross_entropy, examples)
    W, b = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    weight_total = bias_total = 0.0
    for xi, yi in zip(x.numpy(), y.numpy()):
        logits = W @ xi + b
        p = np.exp(logits - logits.max())
        p /= p.sum()
        residual = p - np.eye(3)[yi]
        weight_total += float((np.outer(residual, xi) ** 2).sum())
        bias_total += float((residual ** 2).sum())
    assert groups.names == ["head"]  # the last layer's weight and bias
    assert fisher.tolist() == pytest.approx([(weight_total + bias_total) / len(y)], rel=1e-12)
    assert model.training and all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_matrix_snr_follows_the_marchenko_pastur_edge():
    """A matrix with known singular values: the noise level is their interquartile range / 1.349, the edge
    sigma (1 + sqrt(aspect)); the score is the sum above over the sum below, over the largest."""
    rng = np.random.default_rng(0)
    singular = np.concatenate([[40.0, 25.0], rng.uniform(0.5, 1.5, 10)])
    u, _ = np.linalg.qr(rng.standard_normal((20, 12)))
    v, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    weight = torch.tensor(u @ np.diag(singular) @ v.T)
    q1, q3 = np.quantile(singular, [0.25, 0.75])
    edge = (q3 - q1) / 1.349 * (1 + math.sqrt(12 / 20))
    expected = singular[singular > edge].sum() / singular[singular <= edge].sum() / singular.max()
    assert signals.matrix_snr(weight) == pytest.approx(expected, rel=1e-9)
    if torch.cuda.is_available():  # the quantiles' points on the matrix's device (found on an H100)
        assert signals.matrix_snr(weight.cuda()) == pytest.approx(expected, rel=1e-9)
    assert signals.matrix_snr(torch.zeros(4, 6)) == 0.0
    structured = torch.tensor(u[:, :2] @ np.diag([40.0, 25.0]) @ v[:, :2].T + 0.01 * rng.standard_normal((20, 12)))
    assert signals.matrix_snr(structured) > signals.matrix_snr(torch.tensor(rng.standard_normal((20, 12))))


def test_weight_snr_scores_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    groups = adapeft.group_parameters(model)
    values = dict(zip(groups.names, signals.weight_snr(groups).tolist()))
    assert values["norm"] == 0.0 and values["bias"] == 0.0  # vectors have no spectrum
    # the head's matrix scores the whole group (its bias has no score of its own)
    assert values["head"] == pytest.approx(signals.matrix_snr(model[2].weight) * (8 * 3 + 3))


def test_random_values_are_a_seeds_own():
    first, again, other = (signals.random_values(6, seed) for seed in (3, 3, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert bool(((first > 0) & (first <= 1)).all())


def test_paired_difference_and_its_t_interval():
    mean, half = common.paired_difference([0.6, 0.7, 0.8], [0.5, 0.5, 0.5])
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert common.paired_difference([0.6], [0.5])[0] == pytest.approx(0.1)
    assert math.isnan(common.paired_difference([0.6], [0.5])[1])


def test_the_comparison_gives_every_signal_the_same_knapsack_and_budget(monkeypatch):
    names, counts = ["a", "b", "c", "d"], [10, 10, 20, 960]
    trained_sets = []

    def fake_training(folder, trained, train, test, settings, seed, device, label):
        trained_sets.append((label, trained))
        accuracy = 0.5 + 0.01 * seed + (0.1 if trained and "c" in trained else 0.0)
        return {"label": label, "seed": seed, "trainable": 1, "share": 0.01, "test_accuracy": accuracy,
                "test_loss": 1.0, "final_train_loss": 1.0, "seconds": 0.0}

    monkeypatch.setattr(demo, "train_target", fake_training)
    monkeypatch.setattr(demo, "BASELINES", {"linear probing": ("a",)})
    frontier = adapeft.select(values=[1.0, 2.0, 3.0, 0.0], counts=counts, names=names, method="pareto")
    selection = adapeft.select(values=[1.0, 2.0, 3.0, 0.0], counts=counts, names=names, budget=0.03, method="exact")
    cheap = {"names": names, "counts": counts, "AdaPEFT": {"seconds": 1.0, "passes": 17},
             "squared gradient": {"values": torch.tensor([5.0, 1.0, 1.0, 9.0]), "seconds": 0.1, "passes": 0},
             "Fisher": {"values": torch.tensor([1.0, 5.0, 0.5, 9.0]), "seconds": 0.2, "passes": 32},
             "weight SNR": {"values": torch.tensor([0.0, 0.0, 0.0, 99.0]), "seconds": 0.3, "passes": 0},
             "random": {"seconds": 0.0, "passes": 0}}
    rows = demo.compare_methods(None, frontier, selection, None, None, {}, (0, 1, 2), "cpu", lambda *_: None,
                                cheap=cheap, budget=0.03)
    by_method = {row["method"]: row for row in rows}
    assert by_method["AdaPEFT (selected)"]["groups"] == "b, c" and by_method["AdaPEFT (selected)"]["difference"] == 0
    assert by_method["squared gradient"]["groups"] == "a, b"  # d does not fit: 3% of 1000 is 30 parameters
    assert by_method["squared gradient"]["difference"] == pytest.approx(-0.1)
    assert by_method["squared gradient"]["difference_ci95"] == pytest.approx(0.0, abs=1e-12)
    assert by_method["Fisher"]["signal_passes"] == 32 and by_method["AdaPEFT (selected)"]["signal_passes"] == 17
    assert by_method["weight SNR"]["groups"] == ""  # nothing of value fits
    random_sets = [trained for label, trained in trained_sets if label.startswith("random")]
    assert len(random_sets) == 3 and all(sum(counts[names.index(n)] for n in s) <= 30 for s in random_sets)
    assert "linear probing" in by_method and "AdaPEFT top-1" in by_method
