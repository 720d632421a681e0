"""The popularity baseline as a model, so the same evaluation code scores it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys.data.batch import Batch
from recsys.data.spec import FeatureSpec


class Popularity(nn.Module):
    """Scores a (user, item) pair by the item's training popularity, Platt-scaled.

    The logit of item i is ``a * log(1 + count_i) + b`` with ``a >= 0``: the ranking is
    always "most trained-on items first" (every user gets the same list), and
    ``sigmoid(logit)`` is a calibrated probability, so logloss and accuracy mean something.
    When popularity does not separate positives from negatives, ``a = 0`` and every item
    gets the training base rate.

    Not trained by gradient steps: call `fit` with the training statistics per item. The
    counts, ``a`` and ``b`` are buffers, so a saved module reloads fitted.

    Example::

            >>> import torch
            >>> from recsys.data import FeatureSpec
            >>> from recsys.data.store import FeatureStore
            >>> spec = FeatureSpec.of_ids(num_users=10, num_items=20)
            >>> users, items = torch.tensor([0, 3]), torch.tensor([5, 7])
            >>> batch = FeatureStore(spec, None, None).make_batch(users, items)
            >>> net = Popularity(spec)
            >>> counts = torch.arange(20.0)  # training interactions per item
            >>> net = net.fit(counts, positives=counts / 2, negatives=counts / 2 + 1)
            >>> probs = torch.sigmoid(net(batch))  # [B]
            >>> bool(probs[1] > probs[0])  # item 7 is more popular than item 5
            True
    """

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.register_buffer("counts", torch.zeros(spec.num_items))
        self.register_buffer("a", torch.zeros(()))
        self.register_buffer("b", torch.zeros(()))

    def fit(
        self,
        counts: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor,
        max_iter: int = 100,
    ) -> Popularity:
        """Keep the popularity and fit ``a >= 0`` and ``b`` by logistic regression.

        The fit is over num_items points x_i = log(1 + counts_i), item i weighing
        ``positives_i`` times with label 1 and ``negatives_i`` times with label 0 (the
        training rows aggregated per item). L-BFGS in float64 fits (a, b); if the optimum
        has a < 0, the constrained optimum lies on a = 0, where b is the logit of the base
        rate. Deterministic: every process fits the same values.

        Args:
            counts: [num_items] training interactions per item (the ranking score).
            positives: [num_items] positive training examples per item.
            negatives: [num_items] negative training examples per item.
            max_iter: L-BFGS iterations.

        Raises:
            ValueError: shapes other than [num_items], or no positive and negative examples.
        """
        n = self.counts.shape[0]
        for name, t in (("counts", counts), ("positives", positives), ("negatives", negatives)):
            if t.shape != (n,):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; pass [num_items={n}]")
        pos, neg = positives.double().cpu(), negatives.double().cpu()
        total_pos, total = float(pos.sum()), float(pos.sum() + neg.sum())
        if total_pos <= 0 or total_pos >= total:
            raise ValueError(
                f"Popularity.fit needs positive and negative examples; got {total_pos:g} "
                f"positives of {total:g}: a constant would predict the training labels"
            )
        x = torch.log1p(counts.double().cpu())
        base = torch.logit(torch.tensor(total_pos / total, dtype=torch.float64))
        params = torch.stack([torch.zeros((), dtype=torch.float64), base]).requires_grad_()
        opt = torch.optim.LBFGS([params], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            z = params[0] * x + params[1]
            loss = (pos * F.softplus(-z) + neg * F.softplus(z)).sum() / total
            loss.backward()
            return loss

        opt.step(closure)
        a, b = params.detach()
        if not (bool(torch.isfinite(a)) and bool(torch.isfinite(b))) or a < 0:
            a, b = torch.zeros((), dtype=torch.float64), base
        self.counts.copy_(counts)
        self.a.copy_(a)
        self.b.copy_(b)
        return self

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns: logits [B], ``a * log(1 + count) + b`` of each pair's item."""
        return self.a * torch.log1p(self.counts[batch.ids("item_id")]) + self.b
