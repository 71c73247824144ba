"""How good a representation is: kNN and linear-probe accuracy of frozen encoder features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def features(encoder: nn.Module, images: Tensor, batch_size: int = 1024) -> Tensor:
    """Encoder outputs (eval mode: BatchNorm running statistics), fp32, (N, F)."""
    was_training = encoder.training
    encoder.eval()
    try:
        return torch.cat([encoder(chunk).float() for chunk in images.split(batch_size)])
    finally:
        encoder.train(was_training)


@torch.no_grad()
def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018): class score = sum over the k nearest
    training samples of exp(cos / temperature); accuracy in percent."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    bank, k = F.normalize(train_x, dim=1), min(k, train_x.shape[0])
    correct = 0
    for x, y in zip(F.normalize(test_x, dim=1).split(chunk), test_y.split(chunk)):
        sim, idx = (x @ bank.T).topk(k, dim=1)
        votes = torch.zeros(x.shape[0], classes, device=x.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == y).sum())
    return 100.0 * correct / test_y.shape[0]


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *,
                          weight_decay: float = 1e-4, iterations: int = 100) -> float:
    """Multinomial logistic regression on standardised frozen features (full-batch L-BFGS, L2
    penalty); accuracy in percent on the test split. Deterministic (zero initialisation)."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = nn.Linear(train_x.shape[1], classes).to(train_x.device)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(train_x), train_y) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return 100.0 * float((probe(test_x).argmax(dim=1) == test_y).float().mean())


def evaluate(encoder: nn.Module, data, *, k: int = 20) -> dict:
    """{"knn": %, "linear": %} of `encoder` on the data set's train (bank / probe fit) and test split."""
    train_x, test_x = features(encoder, data.train_images), features(encoder, data.test_images)
    return {
        "knn": knn_accuracy(train_x, data.train_labels, test_x, data.test_labels, k=k),
        "linear": linear_probe_accuracy(train_x, data.train_labels, test_x, data.test_labels),
    }
