"""The one training loop (mscnn.train): steps, epochs, evaluation, early stopping."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mscnn.data import Split
from mscnn.ode import ODENet
from mscnn.optim import BCD
from mscnn.train import (
    Step,
    TorchStep,
    accuracy,
    eval_batch_size,
    evaluate,
    fit,
    make_step,
    split_batches,
    train_epoch,
)


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 3, generator=g), torch.randint(0, 4, (n,), generator=g))


def test_evaluate_sums_match_a_full_batch_computation():
    torch.manual_seed(0)
    model, d = nn.Linear(3, 4), _data(37)
    out = evaluate(model, split_batches(d, 10))
    logits = model(d.x).detach()
    assert out["count"] == 37
    assert out["loss_sum"] == pytest.approx(F.cross_entropy(logits, d.y, reduction="sum").item(), rel=1e-6)
    assert out["correct"] == (logits.argmax(1) == d.y).sum().item()
    assert out["accuracy"] == out["correct"] / 37 and model.training  # mode restored


def test_eval_batch_size_fits_the_widest_activation_into_the_cpu_budget():
    """On a CPU: the budget over the largest submodule output of one example, within [16, cap]."""
    net = ODENet(channels=16, steps=2, n=28, classes=10)
    x = torch.randn(5, 1, 28, 28)
    assert eval_batch_size(net, x) == 2**21 // (16 * 28 * 28 * 4) == 41  # a 16x28x28 float map
    assert eval_batch_size(net, x, cpu_bytes=2**24) == 2**24 // (16 * 28 * 28 * 4)
    assert eval_batch_size(net, x, cap=30) == 30 and eval_batch_size(net, x, cpu_bytes=1) == 16
    assert net.training  # mode restored, no hook left behind
    assert not any(m._forward_hooks for m in net.modules())
    assert eval_batch_size(net, torch.empty(1, 1, 28, 28, device="meta"), cap=700) == 700  # not a CPU
    d = Split(torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,)))
    assert accuracy(net, d) == accuracy(net, d, batch_size=100)  # the batch changes speed only


def test_torch_step_is_one_plain_sgd_step():
    torch.manual_seed(0)
    model, d = nn.Linear(3, 4), _data(8)
    w0 = model.weight.detach().clone()
    g = torch.autograd.grad(F.cross_entropy(model(d.x), d.y), model.weight)[0]
    step = TorchStep(model, torch.optim.SGD(model.parameters(), lr=0.5))
    loss = step(d.x, d.y)
    torch.testing.assert_close(model.weight.detach(), w0 - 0.5 * g)
    assert loss.requires_grad is False and isinstance(step, Step)


def test_train_epoch_weights_the_loss_by_batch_size_and_counts_batches():
    losses = iter([1.0, 4.0])
    batches = [(torch.zeros(3, 1), torch.zeros(3)), (torch.zeros(1, 1), torch.zeros(1))]
    rec = train_epoch(lambda x, y: next(losses), batches)
    assert rec["loss"] == pytest.approx((3 * 1.0 + 1 * 4.0) / 4)
    assert (rec["images"], rec["batches"]) == (4, 2)


def test_fit_stops_early_and_ends_with_the_best_weights():
    torch.manual_seed(0)
    model, d = nn.Linear(3, 4), _data(40)
    initial = model.weight.detach().clone()

    class Worsen:  # every step scrambles the weights: validation never improves on epoch 0
        def __call__(self, x, y):
            with torch.no_grad():
                model.weight.mul_(-1.0).add_(torch.randn_like(model.weight))
            return 0.0

    hist = fit(model, d, epochs=10, batch_size=40, step=Worsen(), val=d, patience=2)
    accs = [h["val_accuracy"] for h in hist]
    assert len(hist) == 1 + 2 + (accs.index(max(accs)))  # stopped 2 epochs after the best one
    ref = evaluate(model, split_batches(d, 40))["accuracy"]
    assert ref == max(accs)  # the weights of the best epoch were restored
    assert not torch.equal(model.weight, initial)  # it trained (epoch 0), then kept its best


def test_make_step_by_name():
    net = ODENet(channels=2, n=8, classes=3)
    assert isinstance(make_step(net, "bcd", newton_steps=1, batch_size=5), BCD)
    assert isinstance(make_step(net, "adam", 1e-3, total_steps=4).scheduler,
                      torch.optim.lr_scheduler.CosineAnnealingLR)
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'; valid: \['adam', 'adamw', 'sgd'\]"):
        make_step(net, "lion", total_steps=1)
    with pytest.raises(ValueError, match="cosine annealing needs total_steps"):
        make_step(net, "adam")
