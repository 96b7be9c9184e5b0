"""Closed-form and convex heads on episode features: MetaOptNet's SVM and R2-D2's ridge regression.

Both learners embed the support and query images with the shared backbone, fit a
linear classifier ``W`` (``[N, D]``) to the support features by a convex problem solved
inside the forward pass, and backpropagate through that solution into the backbone.

**R2-D2** (Bertinetto et al. 2019, "Meta-learning with differentiable closed-form
solvers"): ridge regression of the one-hot labels ``Y`` on the support features ``X``
(``[S, D]``), in the Woodbury form ``W^T = X^T (X X^T + lambda I)^{-1} Y``, so the system
solved is ``S x S`` (``S = N*K`` support images) however wide the features are;
``logits = alpha * (f(q) W^T) + beta`` with the meta-learned scale ``alpha``, bias ``beta``
and (``learn_lambda=True``) regulariser ``lambda``, kept positive as ``exp(log_lambda)``.
The paper reports Omniglot 5- and 20-way 1- and 5-shot accuracies for its 4-layer CNN (Table 1).

**MetaOptNet** (Lee et al. 2019, "Meta-Learning with Differentiable Convex
Optimization"): a Crammer-Singer multi-class SVM, solved in its dual as in the
authors' code. With ``alpha`` (``[S, N]``), ``K = X X^T`` and ``Y`` one-hot:

    min_alpha  1/2 tr(alpha^T K alpha) + ridge/2 ||alpha||^2 - sum_i alpha[i, y_i]
    s.t.       alpha[i, c] <= C * Y[i, c],   sum_c alpha[i, c] = 0,

``W = alpha^T X`` and ``logits = scale * f(q) W^T``. ``ridge`` is the authors' ``+1.0 * I`` on
the block kernel (the SVM on the features with one private unit coordinate per support
image); it makes the dual strongly convex, so its solution is unique and differentiable.
The paper reports no Omniglot results (miniImageNet, tieredImageNet, CIFAR-FS, FC100).

The solver (:func:`svm_dual`): the authors use ``qpth`` (a batched interior-point
method); the package (0.0.18, sdist only) pins ``numpy<2`` and pulls in ``cvxpy``, so it
is not used. Instead, in ``mu = C*Y - alpha`` each support image's constraints are a
simplex (``mu_i >= 0``, ``sum_c mu_i[c] = C``):

1. ``steps`` accelerated projected-gradient (FISTA) steps from ``alpha = 0``, each a
   ``K @ mu`` and a sort-based simplex projection, without gradient;
2. ``refine`` primal-dual active-set steps (Hintermueller et al. 2002), each the KKT
   system of the equality-constrained QP on the current guess of the zero ``mu``
   entries, a dense ``(S*N + S)``-square solve; they find the exact active set in a
   step or two from FISTA's guess;
3. the KKT system of that active set once more, with gradient: its solution is the
   solution of the SVM, and autograd through ``torch.linalg.solve_ex`` differentiates it
   exactly as the implicit function theorem does (qpth's backward is the same solve).

All steps have fixed counts and run on the features' device, with no host sync; the
learner's ``solver_residual`` (a ``[B]`` tensor, :func:`kkt_residual`) says after
each call how far the last solution is from the KKT conditions.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data.episodes import EpisodeBatch
from ..errors import MetafewError
from .base import Classifier, Learner, infer_n_way
from .bn import BNPolicy, Frozen, Stats
from .matchingnet import one_hot
from .registry import register_learner

# -- R2-D2's ridge regression -------------------------------------------------------------


def ridge_weights(features: Tensor, onehot: Tensor, lam: Tensor | float) -> Tensor:
    """``W = (X^T (X X^T + lam I)^{-1} Y)^T``, ``[..., N, D]``, from ``X`` ``[..., S, D]`` and ``Y`` ``[..., S, N]``."""
    s = features.shape[-2]
    eye = torch.eye(s, dtype=features.dtype, device=features.device)
    gram = features @ features.transpose(-1, -2) + lam * eye  # [..., S, S]
    solution, _ = torch.linalg.solve_ex(gram, onehot)  # _ex: no error check, so no host sync on CUDA
    return solution.transpose(-1, -2) @ features  # (Y^T (X X^T + lam I)^{-1}) X


# -- MetaOptNet's Crammer-Singer SVM --------------------------------------------------------


def project_simplex(v: Tensor, radius: float) -> Tensor:
    """Euclidean projection of each row of ``v`` (last dim) onto ``{x >= 0, sum x = radius}`` (Duchi et al. 2008)."""
    u, _ = v.sort(dim=-1, descending=True)
    excess = u.cumsum(-1) - radius
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = (u - excess / k > 0).sum(-1, keepdim=True)  # >= 1: the first entry always qualifies
    theta = excess.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp(min=0)


def _kkt_solve(gram: Tensor, onehot: Tensor, free: Tensor, c: float, ridge: float) -> tuple[Tensor, Tensor]:
    """``(mu, lagrangian gradient)``: the QP in ``mu`` with the entries outside ``free`` held at 0.

    In ``mu = C*Y - alpha`` the dual is ``min 1/2 mu^T Q mu + q^T mu`` with ``Q = K (x) I + ridge I``,
    ``q = y - C Q y``, subject to ``mu >= 0`` and ``sum_c mu[i, c] = C``. With the zero entries
    fixed the KKT conditions are one linear system in ``(mu, nu)`` (``nu``: the equality multipliers).
    """
    *batch, s, n = onehot.shape
    eye_n = torch.eye(n, dtype=gram.dtype, device=gram.device)
    eye_sn = torch.eye(s * n, dtype=gram.dtype, device=gram.device)
    q_matrix = (gram[..., :, None, :, None] * eye_n[:, None, :]).reshape(*batch, s * n, s * n) + ridge * eye_sn
    y = onehot.reshape(*batch, s * n)
    q = y - c * (q_matrix @ y.unsqueeze(-1)).squeeze(-1)
    d = free.reshape(*batch, s * n).to(gram.dtype)
    a = torch.eye(s, dtype=gram.dtype, device=gram.device).repeat_interleave(n, dim=-1)  # [S, S*N]: sum over classes
    top = torch.cat(
        [d.unsqueeze(-1) * q_matrix * d.unsqueeze(-2) + torch.diag_embed(1 - d), d.unsqueeze(-1) * a.mT], dim=-1
    )
    bottom = torch.cat([a * d.unsqueeze(-2), torch.zeros(*batch, s, s, dtype=gram.dtype, device=gram.device)], dim=-1)
    rhs = torch.cat([-d * q, torch.full((*batch, s), c, dtype=gram.dtype, device=gram.device)], dim=-1)
    kkt = torch.cat([top, bottom], dim=-2)
    solution = torch.linalg.solve_ex(kkt, rhs.unsqueeze(-1))[0].squeeze(-1)  # _ex: no host sync on CUDA
    mu, nu = solution[..., : s * n], solution[..., s * n :]
    multipliers = (q_matrix @ mu.unsqueeze(-1)).squeeze(-1) + q + (a.mT @ nu.unsqueeze(-1)).squeeze(-1)
    return mu.view(*batch, s, n), multipliers.view(*batch, s, n)


def svm_dual(
    features: Tensor, onehot: Tensor, *, c: float = 0.1, ridge: float = 1.0, steps: int = 50, refine: int = 3
) -> Tensor:
    """The Crammer-Singer dual solution ``alpha`` ``[..., S, N]``, differentiable in ``features`` ``[..., S, D]``.

    ``onehot``: the support labels ``[..., S, N]``; ``c``: the SVM's ``C``; ``ridge``: the
    ``+ridge*I`` on the block kernel (> 0). See the module docstring for the method.
    """
    if ridge <= 0 or c <= 0:
        raise MetafewError(f"svm_dual: c and ridge must be > 0, got c={c!r}, ridge={ridge!r}")
    gram = features @ features.transpose(-1, -2)  # [..., S, S]
    with torch.no_grad():
        k = gram.detach()
        lipschitz = (torch.linalg.matrix_norm(k) + ridge)[..., None, None]  # >= the largest eigenvalue of Q
        target = c * onehot
        linear = onehot - c * (k @ onehot + ridge * onehot)  # q, as an [S, N] matrix

        def gradient(mu: Tensor) -> Tensor:
            return k @ mu + ridge * mu + linear

        mu = target.clone()  # alpha = 0: W = 0, feasible
        z, t = mu, 1.0
        for _ in range(steps):
            new = project_simplex(z - gradient(z) / lipschitz, c)
            t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
            z = new + ((t - 1) / t_next) * (new - mu)
            mu, t = new, t_next
        free = mu > 0
        for _ in range(refine):
            free = _keep_one_free(free, mu)
            mu, multipliers = _kkt_solve(k, onehot, free, c, ridge)
            free = torch.where(free, mu >= 0, multipliers < 0)  # primal-dual active-set update
        free = _keep_one_free(free, mu)
    mu, _ = _kkt_solve(gram, onehot, free, c, ridge)
    return c * onehot - mu


def _keep_one_free(free: Tensor, mu: Tensor) -> Tensor:
    """``free`` with each support image's largest ``mu`` entry free (``sum_c mu = C > 0`` needs one)."""
    return free | (mu == mu.amax(-1, keepdim=True))


def kkt_residual(features: Tensor, onehot: Tensor, alpha: Tensor, *, c: float = 0.1, ridge: float = 1.0) -> Tensor:
    """Largest violation ``[...]`` of the dual's KKT conditions by ``alpha`` (0 at the solution).

    Feasibility (``alpha <= C*Y``, rows summing to 0), dual feasibility (the bound
    multipliers ``lambda >= 0``) and complementary slackness (``lambda * (C*Y - alpha) = 0``),
    with each row's equality multiplier read off its entry of largest slack.
    """
    gram = features @ features.transpose(-1, -2)
    grad = gram @ alpha + ridge * alpha - onehot  # gradient of the dual objective in alpha
    slack = c * onehot - alpha
    nu = -grad.gather(-1, slack.argmax(-1, keepdim=True))  # the free entry of largest slack has lambda = 0
    lam = -(grad + nu)  # stationarity: grad + lambda + nu = 0
    violations = torch.stack(
        [
            (-slack).clamp(min=0).amax((-1, -2)),
            alpha.sum(-1).abs().amax(-1),
            (-lam).clamp(min=0).amax((-1, -2)),
            (lam * slack).abs().amax((-1, -2)),
        ]
    )
    return violations.amax(0)


# -- the learners ---------------------------------------------------------------------------


class _LinearHeadLearner(Learner):
    """Shared by R2-D2 and MetaOptNet: embed the episode, fit ``W`` ``[..., N, D]``, score the queries."""

    bn = Frozen()
    adapt_defaults: ClassVar[dict[str, Any]] = {}
    default_optimizer: dict[str, Any] = {"name": "adam", "lr": 1e-3}  # noqa: RUF012 - per-class default, each learner's __init__ copies it per instance

    def __init__(self, backbone: nn.Module, *, amp: str | None = None) -> None:
        super().__init__(backbone, amp=amp)

    def head(self, support: Tensor, onehot: Tensor) -> Tensor:
        """The classifier ``W`` ``[..., N, D]`` fitted to support features ``[..., S, D]`` (each learner's method)."""
        raise NotImplementedError

    def logits(self, query: Tensor, weight: Tensor) -> Tensor:
        """Logits ``[..., M, N]`` of query features ``[..., M, D]`` under the head ``W`` ``[..., N, D]``."""
        raise NotImplementedError

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        """Query logits ``[B, M, N]`` of every task, embedding all images of the batch in one call."""
        support, query, n_way = self.episode_features(batch)
        return self.logits(query, self.head(support, one_hot(batch.support_y, n_way, support.dtype)))

    def meta_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Cross-entropy of the queries over the batch's tasks, through the head's solution."""
        return self.episodic_loss(batch)

    def fit(self, support_x: Tensor, support_y: Tensor, bn: BNPolicy, stats: Stats | None) -> LinearHeadClassifier:
        """The head fitted to the support features, wrapped as a classifier."""
        n_way = infer_n_way(support_y, None)
        with bn.while_adapting(self.backbone, stats):
            support = self.embed(support_x)
        return LinearHeadClassifier(self, self.head(support, one_hot(support_y, n_way, support.dtype)), bn=bn)


@register_learner("r2d2")
class R2D2(_LinearHeadLearner):
    """R2-D2: a ridge-regression head in closed form (Woodbury), with meta-learned scale, bias and lambda.

    Args:
        backbone: feature extractor (shared, never copied).
        lam: the ridge regulariser ``lambda`` (its initial value when learned).
        learn_lambda: meta-learn ``lambda`` (as ``log_lambda``, a parameter) or keep it fixed.
        scale, bias: initial logit scale ``alpha`` and bias ``beta`` (both meta-learned).
        amp: ``"bf16"`` to embed under autocast (the solve is in float32).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        lam: float = 1.0,
        learn_lambda: bool = True,
        scale: float = 10.0,
        bias: float = 0.0,
        amp: str | None = None,
    ) -> None:
        super().__init__(backbone, amp=amp)
        if lam <= 0:
            raise MetafewError(f"R2D2: lam must be > 0, got {lam!r}")
        log_lambda = torch.tensor(float(lam)).log()
        if learn_lambda:
            self.log_lambda = nn.Parameter(log_lambda)
        else:
            self.register_buffer("log_lambda", log_lambda)
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    @property
    def lam(self) -> Tensor:
        """The ridge regulariser ``lambda = exp(log_lambda)`` (0-dim tensor)."""
        return self.log_lambda.exp()

    def head(self, support: Tensor, onehot: Tensor) -> Tensor:
        return ridge_weights(support, onehot, self.lam.to(support.dtype))

    def logits(self, query: Tensor, weight: Tensor) -> Tensor:
        return self.scale * (query @ weight.transpose(-1, -2)) + self.bias


@register_learner("metaoptnet")
class MetaOptNet(_LinearHeadLearner):
    """MetaOptNet-SVM: a Crammer-Singer SVM head solved in the forward pass, with a meta-learned logit scale.

    Args:
        backbone: feature extractor (shared, never copied).
        c: the SVM's ``C`` (the authors' ``C_reg = 0.1``).
        ridge: the ``+ridge*I`` on the dual's block kernel (the authors' 1.0); must be > 0.
        solver_steps: FISTA steps that guess the active set; ``refine``: active-set steps after them.
        scale: initial logit scale (meta-learned; the authors start at 1).
        amp: ``"bf16"`` to embed under autocast (the solve is in float32).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        c: float = 0.1,
        ridge: float = 1.0,
        solver_steps: int = 50,
        refine: int = 3,
        scale: float = 1.0,
        amp: str | None = None,
    ) -> None:
        super().__init__(backbone, amp=amp)
        if c <= 0 or ridge <= 0:
            raise MetafewError(f"MetaOptNet: c and ridge must be > 0, got c={c!r}, ridge={ridge!r}")
        if solver_steps < 0 or refine < 1:
            raise MetafewError("MetaOptNet: solver_steps must be >= 0 and refine >= 1")
        self.c, self.ridge, self.solver_steps, self.refine = c, ridge, solver_steps, refine
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.solver_residual: Tensor | None = None  # KKT residual of the last solve, per task

    def head(self, support: Tensor, onehot: Tensor) -> Tensor:
        opts = {"c": self.c, "ridge": self.ridge}
        alpha = svm_dual(support, onehot, steps=self.solver_steps, refine=self.refine, **opts)
        with torch.no_grad():
            self.solver_residual = kkt_residual(support.detach(), onehot, alpha.detach(), **opts)
        return alpha.transpose(-1, -2) @ support

    def logits(self, query: Tensor, weight: Tensor) -> Tensor:
        return self.scale * (query @ weight.transpose(-1, -2))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", c={self.c}, ridge={self.ridge}"


class LinearHeadClassifier(Classifier):
    """Scores query images with the fitted head ``weight`` (a buffer ``[N, D]``) and the learner's scale."""

    saved = ("weight",)
    learner: _LinearHeadLearner
    weight: Tensor

    def __init__(self, learner: _LinearHeadLearner, weight: Tensor, **kw: Any) -> None:
        super().__init__(learner, **kw)
        self.register_buffer("weight", weight)

    def logits(self, query_x: Tensor) -> Tensor:
        return self.learner.logits(self.learner.embed(query_x), self.weight)


R2D2.classifier_type = LinearHeadClassifier
MetaOptNet.classifier_type = LinearHeadClassifier
