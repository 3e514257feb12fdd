"""Incremental PCA in torch: PEFT's ``peft.utils.incremental_pca.IncrementalPCA`` (itself scikit-learn's
algorithm, Ross et al. 2008), the ``partial_fit`` path EVA uses, with its randomized SVD (``torch.svd_lowrank``,
``q = 2 n_components``, 4 subspace iterations, seed 42 in a forked RNG) and its dtypes (the first batch in
fp32, later ones in fp64 once the fp64 mean correction is stacked in), so EVA's components equal PEFT's.
"""

from __future__ import annotations

import torch


def incremental_mean_and_var(
    x: torch.Tensor, last_mean: torch.Tensor | None, last_var: torch.Tensor | None, last_count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s pairwise update of per-column mean and variance (fp64 sums), as scikit-learn / PEFT."""
    new_count = torch.tensor([x.shape[0]], device=x.device)
    count = last_count + new_count
    last_sum = (
        torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if last_mean is None else last_mean * last_count
    )
    new_sum = x.sum(dim=0, dtype=torch.float64)
    mean = (last_sum + new_sum) / count
    centred = x - new_sum / new_count
    correction = centred.sum(dim=0, dtype=torch.float64).square()
    centred.square_()
    new_unnormalized = centred.sum(dim=0, dtype=torch.float64)
    new_unnormalized -= correction / new_count
    if last_var is None:
        return mean, new_unnormalized / count, count
    last_over_new = last_count.double() / new_count
    unnormalized = (
        last_var * last_count + new_unnormalized + last_over_new / count * (last_sum / last_over_new - new_sum).square()
    )
    return mean, unnormalized / count, count


def svd_flip_rows(u: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs fixed so that each row of ``vt`` has its largest-magnitude entry positive (``u_based_decision=False``)."""
    signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])
    u *= signs[: u.shape[1]].view(1, -1)
    vt *= signs.view(-1, 1)
    return u, vt


class IncrementalPCA:
    """``partial_fit`` over batches of rows; ``components_`` (k x features), ``singular_values_``,
    ``explained_variance_ratio_`` after each call."""

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4):
        self.n_components, self.seed, self.niter = n_components, seed, niter
        self.q = 2 * n_components
        self.components_: torch.Tensor | None = None
        self.singular_values_: torch.Tensor | None = None
        self.explained_variance_ratio_: torch.Tensor | None = None
        self.mean_: torch.Tensor | None = None
        self.var_: torch.Tensor | None = None
        self.n_samples_seen_: torch.Tensor | None = None

    def _svd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the caller's RNG streams are left untouched
            torch.manual_seed(self.seed)
            u, s, v = torch.svd_lowrank(x, q=self.q, niter=self.niter)
        return u, s, v.mH

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> IncrementalPCA:
        """Fold a batch of rows ``x`` (n x features, n >= n_components) into the running decomposition."""
        x = x.clone()
        n_samples, n_features = x.shape
        if not self.n_components <= min(n_samples, n_features):
            raise ValueError(f"n_components={self.n_components} exceeds the batch's {n_samples} x {n_features}")
        first = self.components_ is None
        if first:
            self.n_samples_seen_ = torch.tensor([0], device=x.device)
        mean, var, total = incremental_mean_and_var(x, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            factor = torch.sqrt((self.n_samples_seen_.double() / total) * n_samples)
            x = torch.vstack(
                (self.singular_values_.view((-1, 1)) * self.components_, x, factor * (self.mean_ - batch_mean))
            )
        u, s, vt = self._svd(x)
        u, vt = svd_flip_rows(u, vt)
        ratio = s**2 / torch.sum(var * total)
        k = self.n_components
        self.n_samples_seen_, self.mean_, self.var_ = total, mean, var
        self.components_, self.singular_values_, self.explained_variance_ratio_ = vt[:k], s[:k], ratio[:k]
        return self
