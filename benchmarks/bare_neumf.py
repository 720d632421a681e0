"""The reference: NeuMF trained by a bare, vectorised PyTorch loop, as one would write it by hand.

No Lightning, no Hydra, no TorchRec: four ``nn.Embedding`` tables, an ``nn.Sequential`` MLP,
a linear head and binary cross-entropy, stepped by the optimizer it is given (in
`benchmarks/training.py` the platform's: `recsys.bench.reference_optimizer`). Batches are built
by indexing tensors: each epoch shuffles the positives once and draws every negative of the
epoch in one call (uniform over the items, redrawn where a draw hits one of the user's training
items), the same sampling as the platform's. `benchmarks/training.py` times it beside the
platform and RecBole on the same training pairs.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn


class BareNeuMF(nn.Module):
    """logit = h . [p_u * q_i ; MLP([p'_u ; q'_i])] + b (He et al. 2017)."""

    def __init__(self, num_users: int, num_items: int, gmf_dim: int, mlp_dim: int, layers):
        super().__init__()
        self.gmf_user = nn.Embedding(num_users, gmf_dim)
        self.gmf_item = nn.Embedding(num_items, gmf_dim)
        self.mlp_user = nn.Embedding(num_users, mlp_dim)
        self.mlp_item = nn.Embedding(num_items, mlp_dim)
        blocks, width = [], 2 * mlp_dim
        for out in layers:
            blocks += [nn.Linear(width, out), nn.ReLU()]
            width = out
        self.mlp = nn.Sequential(*blocks)
        self.head = nn.Linear(gmf_dim + width, 1)
        for table in (self.gmf_user, self.gmf_item, self.mlp_user, self.mlp_item):
            nn.init.normal_(table.weight, std=0.01)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        gmf = self.gmf_user(users) * self.gmf_item(items)
        mlp = self.mlp(torch.cat([self.mlp_user(users), self.mlp_item(items)], 1))
        return self.head(torch.cat([gmf, mlp], 1)).squeeze(1)


def sample_negatives(
    users: torch.Tensor, known: torch.Tensor, num_items: int, n: int, g: torch.Generator
) -> torch.Tensor:
    """[len(users) * n] items, none of them a training item of its user; ``known`` holds the
    sorted keys user * num_items + item of the training pairs."""
    users = users.repeat_interleave(n)
    items = torch.randint(num_items, (len(users),), generator=g, device=users.device)
    bad = torch.isin(users * num_items + items, known)
    while bad.any():
        items[bad] = torch.randint(num_items, (int(bad.sum()),), generator=g, device=users.device)
        bad[bad.clone()] = torch.isin(users[bad] * num_items + items[bad], known)
    return items


def train_epoch(
    model: BareNeuMF,
    optimizer: torch.optim.Optimizer,
    users: torch.Tensor,
    items: torch.Tensor,
    num_items: int,
    batch_size: int,
    num_negatives: int,
    seed: int = 0,
) -> tuple[int, float, float]:
    """One epoch over the positive pairs (users, items), ``batch_size`` positives per step,
    each with ``num_negatives`` sampled negatives. Returns (samples, seconds, mean loss); the
    seconds cover the sampling, the shuffle and every step."""
    start = time.perf_counter()
    g = torch.Generator(users.device).manual_seed(seed)
    known = torch.unique(users * num_items + items)
    order = torch.randperm(len(users), generator=g, device=users.device)
    users, items = users[order], items[order]
    negatives = sample_negatives(users, known, num_items, num_negatives, g).view(-1, num_negatives)
    labels = torch.ones(batch_size * (1 + num_negatives), device=users.device)
    labels[batch_size:] = 0
    total, steps = 0.0, 0
    for lo in range(0, len(users), batch_size):
        u, i = users[lo : lo + batch_size], items[lo : lo + batch_size]
        neg = negatives[lo : lo + batch_size].flatten()
        y = labels if len(u) == batch_size else torch.cat([labels[: len(u)], labels[-len(neg) :]])
        logits = model(torch.cat([u, u.repeat_interleave(num_negatives)]), torch.cat([i, neg]))
        loss = F.binary_cross_entropy_with_logits(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()  # no device sync per step
        steps += 1
    mean_loss = float(total) / steps
    return len(users) * (1 + num_negatives), time.perf_counter() - start, mean_loss
