"""ONE equivalence test: every head's distribution against a dense NumPy / SciPy reference.

As distrax's `equivalence.py` and TFP's `testVersusMVNTriL`: each case declares its reference,
built from the packed parameters with NumPy alone (the documented `params` layout, not the
library's `split_params`, `covariance_parts` or `covariance()`), and one parametrised test
compares `log_prob`, `mean`, `variance`, the covariance and the sample moments of the head's
sampler against it, with and without antithetic pairs and with the head's default.

```none
case                      reference over x = vec(event), row-major (*S, C) or (L)
LowRankLogits             N(mu, P P^T + diag(transform(d_raw) + epsilon))       dense, prod(S)*C
HeteroscedasticLogits     N(mu, diag(exp(s)))                                    K = 0
  (low_rank_classes=K)    N(mu, blockdiag_pixels(V V^T + diag(exp(s))))          K > 0, C x C
CategoricalLogits         point mass at the logits: Sigma = 0; log p = 0 at mu, -inf elsewhere
LatentEncoder             N(mu, diag((softplus(raw + log(e - 1)) + epsilon)^2))  event [L]
MixtureLowRankLogits      sum_k pi_k N(mu_k, P_k P_k^T + diag(D_k))   pi = softmax(mean_pixels a)

sample moments of n = 20000 draws (fixed seed), n_eff = n, or n / 2 antithetic pairs, and
k = max(5, z_(alpha / 2m)) for m compared entries, alpha = 2e-3 (Bonferroni over the entries:
k = 5 for the 36-dimensional image events, 5.5 for the 180-dimensional volume events):
  |mean_hat_i - mu_i| <= k sqrt(Sigma_ii / n)         antithetic: mean_hat == mu (rounding only)
  |S_ij - Sigma_ij|   <= k sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / n_eff)   (Gaussian Var S_ij)
mixtures: Var S_ij = E[(x_i - mu_i)^2 (x_j - mu_j)^2] - Sigma_ij^2, the fourth moment summed over
  components (a = mu_k - mu, S = Sigma_k): a_i^2 a_j^2 + a_i^2 S_jj + a_j^2 S_ii + 4 a_i a_j S_ij
  + S_ii S_jj + 2 S_ij^2 (Isserlis); antithetic pairs share a component, so their mean is not
  exact: |mean_hat_i - mu_i| <= k sqrt(Sigma_ii / n_eff), and n_eff = n / 2 bounds Var S_ij
```

Sizes are tiny (3 x 4 pixels, 3 classes, rank 2: a 36-dimensional event) so that the dense
covariance, SciPy's density and the sample covariance are cheap. Every head also runs on volumes
(`spatial_dims=3`, 3 x 4 x 5 voxels: a 180-dimensional event) through the same test: the
references are written over the flattened event, row-major over `(*S, C)`, for any `S`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats

import tfp_seg

B, H, W, C, R, L = 2, 3, 4, 3, 2, 3
SPATIAL = {"image": (H, W), "volume": (3, 4, 5)}  # S: (H, W) or (D, H, W)
NUM_SAMPLES = 20000
K_SIGMA = 5.0  # at least
FAMILY_ALPHA = 2e-3  # the chance that any of the m entries of one comparison exceeds k sigma


def _k_sigma(entries: int) -> float:
    """`max(5, z_(alpha / 2m))`: k standard errors for m entries compared at once."""
    return max(K_SIGMA, float(scipy.stats.norm.isf(FAMILY_ALPHA / (2 * entries))))


SAMPLING = {"independent": False, "antithetic": True, "default": None}


@dataclasses.dataclass(frozen=True)
class Reference:
    """A dense reference: `mean [B, E]`, `cov [B, E, E]` over the flattened event (float64);
    for a mixture also its `components`: weights `[B, K]`, means `[B, K, E]`, covariances
    `[B, K, E, E]`."""

    mean: np.ndarray
    cov: np.ndarray
    components: Optional[tuple] = None

    def cov_estimator_variance(self) -> np.ndarray:
        """`Var[(x_i - mu_i)(x_j - mu_j)]` `[B, E, E]`: n times the variance of `S_ij`."""
        if self.components is None:  # Gaussian (or a point mass)
            variance = np.diagonal(self.cov, axis1=-2, axis2=-1)
            return variance[:, :, None] * variance[:, None, :] + self.cov**2
        weights, means, covs = self.components
        a = means - self.mean[:, None]  # [B, K, E]
        s = np.diagonal(covs, axis1=-2, axis2=-1)  # [B, K, E]
        a2 = a**2
        fourth = (
            a2[..., :, None] * a2[..., None, :]
            + a2[..., :, None] * s[..., None, :]
            + s[..., :, None] * a2[..., None, :]
            + 4.0 * a[..., :, None] * a[..., None, :] * covs
            + s[..., :, None] * s[..., None, :]
            + 2.0 * covs**2
        )
        return np.einsum("bk,bkij->bij", weights, fourth) - self.cov**2

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """`log p(x)` for points `x [K, B, E]` -> `[K, B]`."""
        if self.components is not None:
            weights, means, covs = self.components
            out = np.empty(x.shape[:2])
            for b in range(x.shape[1]):
                terms = [
                    np.log(w) + scipy.stats.multivariate_normal(m, c).logpdf(x[:, b])
                    for w, m, c in zip(weights[b], means[b], covs[b], strict=True)
                ]
                out[:, b] = scipy.special.logsumexp(np.stack(terms), axis=0)
            return out
        out = np.empty(x.shape[:2])
        for b in range(x.shape[1]):
            if not np.any(self.cov[b]):  # a point mass
                hit = np.all(x[:, b] == self.mean[b], axis=-1)
                out[:, b] = np.where(hit, 0.0, -np.inf)
            else:
                out[:, b] = scipy.stats.multivariate_normal(self.mean[b], self.cov[b]).logpdf(
                    x[:, b]
                )
        return out


# --- references: NumPy only, from the documented params layout --------------------------------
def _softplus(x):
    return np.logaddexp(0.0, x)


def _low_rank_reference(head, params) -> Reference:
    # params[b, h, w] = [ mu (C) | d_raw (C) | P (C*R, row-major [C, R]) ]
    p = params.astype(np.float64)
    c, r = head.num_classes, head.rank
    mu, raw, factor = p[..., :c], p[..., c : 2 * c], p[..., 2 * c :]
    diag = (np.exp(raw) if head.diagonal_transform == "exp" else _softplus(raw)) + head.epsilon
    flat_p = factor.reshape(p.shape[0], -1, r)  # rows in (h, w, c) order
    cov = flat_p @ flat_p.transpose(0, 2, 1)
    cov += np.stack([np.diag(d) for d in diag.reshape(p.shape[0], -1)])
    return Reference(mu.reshape(p.shape[0], -1), cov)


def _heteroscedastic_reference(head, params) -> Reference:
    # params[b, h, w] = [ mu (C) | s = log sigma^2 (C) | V (C*K, row-major [C, K]) ]
    p = params.astype(np.float64)
    c, k = head.num_classes, head.low_rank_classes
    mu = p[..., :c]
    variance = np.exp(np.clip(p[..., c : 2 * c], -20.0, 20.0))
    v = p[..., 2 * c :].reshape(p.shape[:-1] + (c, k))
    blocks = v @ np.swapaxes(v, -1, -2) + variance[..., :, None] * np.eye(c)  # [B, H, W, C, C]
    blocks = blocks.reshape(p.shape[0], -1, c, c)
    cov = np.stack([scipy.linalg.block_diag(*pixels) for pixels in blocks])
    return Reference(mu.reshape(p.shape[0], -1), cov)


def _categorical_reference(head, params) -> Reference:
    mu = params.astype(np.float64).reshape(params.shape[0], -1)
    return Reference(mu, np.zeros(mu.shape + mu.shape[-1:]))


def _mixture_reference(head, params) -> Reference:
    # params[b, h, w] = [ component 0 (S) | ... | component K-1 (S) | a (K) ],  S = C (2 + R),
    # component k in the LowRankLogits layout; mixture logits = the mean over pixels of a.
    p = params.astype(np.float64)
    k, s = head.num_components, head.num_classes * (2 + head.rank)
    gate = p[..., k * s :].reshape(p.shape[0], -1, k).mean(axis=1)  # [B, K]
    weights = np.exp(gate - scipy.special.logsumexp(gate, axis=-1, keepdims=True))
    parts = [_low_rank_reference(head, p[..., j * s : (j + 1) * s]) for j in range(k)]
    means = np.stack([r.mean for r in parts], axis=1)  # [B, K, E]
    covs = np.stack([r.cov for r in parts], axis=1)  # [B, K, E, E]
    mean = np.einsum("bk,bke->be", weights, means)
    centred = means - mean[:, None]
    cov = np.einsum("bk,bkij->bij", weights, covs) + np.einsum(
        "bk,bki,bkj->bij", weights, centred, centred
    )
    return Reference(mean, cov, components=(weights, means, covs))


def _latent_reference(encoder, params) -> Reference:
    # params[b] = [ mu (L) | raw (L) ],  sigma = softplus(raw + log(e - 1)) + epsilon
    p = params.astype(np.float64)
    n = encoder.latent_dim
    scale = _softplus(p[:, n:] + math.log(math.e - 1.0)) + encoder.epsilon
    return Reference(p[:, :n], np.stack([np.diag(s**2) for s in scale]))


# --- random parameters -------------------------------------------------------------------------
def _rng(seed):
    return np.random.default_rng(seed)


def _low_rank_params(head, seed, spatial):
    rng = _rng(seed)
    shape = (B, *spatial)
    parts = [
        rng.normal(size=shape + (C,)),  # mu
        rng.normal(-0.5, 0.5, size=shape + (C,)),  # d_raw
        rng.normal(0.0, 0.5, size=shape + (C * head.rank,)),  # P
    ]
    return np.concatenate(parts, -1).astype("float32")


def _heteroscedastic_params(head, seed, spatial):
    rng = _rng(seed)
    shape = (B, *spatial)
    parts = [
        rng.normal(size=shape + (C,)),  # mu
        rng.normal(-0.5, 0.5, size=shape + (C,)),  # log sigma^2
        rng.normal(0.0, 0.5, size=shape + (C * head.low_rank_classes,)),  # V
    ]
    return np.concatenate(parts, -1).astype("float32")


def _categorical_params(head, seed, spatial):
    return _rng(seed).normal(size=(B, *spatial, C)).astype("float32")


def _mixture_params(head, seed, spatial):
    rng = _rng(seed)
    shape = (B, *spatial)
    parts = []
    for k in range(head.num_components):
        # Components apart (by 1.5 per component), so that the mixture is far from Gaussian.
        parts += [
            rng.normal(1.5 * (k - 0.5 * (head.num_components - 1)), 1.0, size=shape + (C,)),
            rng.normal(-0.5, 0.5, size=shape + (C,)),  # d_raw
            rng.normal(0.0, 0.5, size=shape + (C * head.rank,)),  # P
        ]
    # image-level, as the layer: the same K values at every pixel
    gate = rng.normal(0.0, 0.7, size=(B,) + (1,) * len(spatial) + (head.num_components,))
    parts.append(np.broadcast_to(gate, shape + (head.num_components,)))
    return np.concatenate(parts, -1).astype("float32")


def _latent_params(encoder, seed, spatial):
    rng = _rng(seed)
    return np.concatenate([rng.normal(size=(B, L)), rng.normal(0.0, 0.5, size=(B, L))], -1).astype(
        "float32"
    )


# --- the head under test: its sampler and covariance -------------------------------------------
def _sample_logits(head, params, n, seed, antithetic):
    kwargs = {} if antithetic is None else {"antithetic": antithetic}
    return head.sample_logits(params, n, seed=seed, **kwargs)


def _sample_latent(encoder, params, n, seed, antithetic):
    kwargs = {} if antithetic is None else {"antithetic": antithetic}
    return encoder.sample(params, n, seed=seed, **kwargs)


def _flat_covariance(dist, batch):
    """The dense covariance `[B, E, E]` of the distribution under test: its `covariance()`,
    or for `Independent` over pixels the blocks of the per-pixel distribution."""
    try:
        return np.asarray(dist.covariance()).reshape(batch, -1, _event_size(dist))
    except NotImplementedError:
        pass
    inner = dist.distribution  # tfd.Independent over the pixels
    if inner.event_shape.rank == 1:  # per-pixel MVN over classes
        blocks = np.asarray(inner.covariance()).reshape(batch, -1, C, C)
        return np.stack([scipy.linalg.block_diag(*pixels) for pixels in blocks])
    return np.stack([np.diag(v) for v in np.asarray(dist.variance()).reshape(batch, -1)])


def _event_size(dist):
    return int(np.prod(dist.event_shape))


def _low_rank_parts_covariance(head, params):
    """The covariance the head's `covariance_parts` describe (used by export / uncertainty)."""
    _, factor, diag = (np.asarray(t, np.float64) for t in head.covariance_parts(params))
    flat = factor.reshape(B, -1, factor.shape[-1])
    return flat @ flat.transpose(0, 2, 1) + np.stack([np.diag(d) for d in diag.reshape(B, -1)])


def _heteroscedastic_parts_covariance(head, params):
    _, factor, variance = (np.asarray(t, np.float64) for t in head.covariance_parts(params))
    blocks = factor @ np.swapaxes(factor, -1, -2) + variance[..., :, None] * np.eye(C)
    return np.stack([scipy.linalg.block_diag(*pixels) for pixels in blocks.reshape(B, -1, C, C)])


@dataclasses.dataclass(frozen=True)
class Equivalence:
    """A head and its dense reference.

    make: `make(spatial_dims)` the head; params: `params(head, seed, S)` random packed
    parameters over the spatial shape S;
    reference: `reference(head, params)` -> `Reference` (NumPy only);
    sample: `sample(head, params, n, seed, antithetic)` (antithetic None: the head's default);
    default_antithetic: what the default means for this head;
    parts_covariance: the dense covariance from the head's `covariance_parts`, if it has them.
    """

    make: Callable[[], Any]
    params: Callable[[Any, int], np.ndarray]
    reference: Callable[[Any, np.ndarray], Reference]
    sample: Callable = _sample_logits
    default_antithetic: Callable[[Any], bool] = lambda head: head.antithetic
    parts_covariance: Optional[Callable[[Any, np.ndarray], np.ndarray]] = None
    event_shape: Optional[tuple] = None  # None: the logits' event (*S, C)
    antithetic_mean_exact: bool = True  # False for mixtures: a pair shares a random component
    mean_atol: float = 0.0  # > 0 where the mean is computed (float32 rounding), not a parameter
    volumes: bool = True  # the head takes spatial_dims=3


CASES = {
    "LowRankLogits": Equivalence(
        lambda s: tfp_seg.layers.LowRankLogits(C, rank=R, spatial_dims=s),
        _low_rank_params,
        _low_rank_reference,
        parts_covariance=_low_rank_parts_covariance,
    ),
    "LowRankLogits-softplus": Equivalence(
        lambda s: tfp_seg.layers.LowRankLogits(
            C, rank=R, epsilon=1e-3, diagonal_transform="softplus", spatial_dims=s
        ),
        _low_rank_params,
        _low_rank_reference,
        parts_covariance=_low_rank_parts_covariance,
    ),
    "HeteroscedasticLogits": Equivalence(
        lambda s: tfp_seg.layers.HeteroscedasticLogits(C, spatial_dims=s),
        _heteroscedastic_params,
        _heteroscedastic_reference,
        parts_covariance=_heteroscedastic_parts_covariance,
    ),
    "HeteroscedasticLogits-low-rank": Equivalence(
        lambda s: tfp_seg.layers.HeteroscedasticLogits(C, low_rank_classes=R, spatial_dims=s),
        _heteroscedastic_params,
        _heteroscedastic_reference,
        parts_covariance=_heteroscedastic_parts_covariance,
    ),
    "CategoricalLogits": Equivalence(
        lambda s: tfp_seg.layers.CategoricalLogits(C, spatial_dims=s),
        _categorical_params,
        _categorical_reference,
        default_antithetic=lambda head: False,  # a point mass: every sample is the mean
    ),
    "MixtureLowRankLogits": Equivalence(
        lambda s: tfp_seg.layers.MixtureLowRankLogits(C, num_components=3, rank=R, spatial_dims=s),
        _mixture_params,
        _mixture_reference,
        antithetic_mean_exact=False,
        mean_atol=2e-6,  # sum_k pi_k mu_k in float32
    ),
    "LatentEncoder": Equivalence(
        lambda s: tfp_seg.layers.LatentEncoder(latent_dim=L, filters=(4,), epsilon=1e-3),
        _latent_params,
        _latent_reference,
        sample=_sample_latent,
        default_antithetic=lambda encoder: False,  # `sample(antithetic=False)`
        event_shape=(L,),
        volumes=False,  # an image-level latent: no spatial event
    ),
}
CASE_SHAPES = [
    pytest.param(name, spatial, id=f"{name}-{spatial}")
    for name, case in CASES.items()
    for spatial in SPATIAL
    if spatial == "image" or case.volumes
]


def _points(ref: Reference, seed) -> np.ndarray:
    """`[K, B, E]`: the mean, three reference draws and a point far in the tails."""
    rng = _rng(seed)
    std = np.sqrt(np.diagonal(ref.cov, axis1=-2, axis2=-1))
    points = [ref.mean]
    for _ in range(3):
        draws = [
            rng.multivariate_normal(m, c, method="eigh")
            for m, c in zip(ref.mean, ref.cov, strict=True)
        ]
        points.append(np.stack(draws))
    points.append(ref.mean + np.sign(rng.normal(size=ref.mean.shape)) * (3.0 * std + 0.5))
    # Evaluated in float32 by the head: round the points first so both see the same x.
    return np.stack(points).astype("float32").astype(np.float64)


@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("name,spatial", CASE_SHAPES)
def test_distribution_matches_dense_reference(name, spatial, sampling):
    case = CASES[name]
    shape = SPATIAL[spatial]
    head = case.make(len(shape))
    params = case.params(head, sorted(CASES).index(name), shape)
    ref = case.reference(head, params)
    event_shape = case.event_shape or (*shape, C)
    event_size = int(np.prod(event_shape))
    dist = head.distribution(params)
    assert tuple(dist.batch_shape) == (B,) and tuple(dist.event_shape) == event_shape

    # log_prob at a few points.
    points = _points(ref, seed=1)
    x = points.reshape((len(points), B) + event_shape).astype("float32")
    np.testing.assert_allclose(
        np.asarray(dist.log_prob(x), np.float64), ref.log_prob(points), rtol=1e-4, atol=1e-4
    )

    # mean, variance, covariance.
    np.testing.assert_allclose(
        np.asarray(dist.mean()).reshape(B, -1), ref.mean, rtol=1e-6, atol=case.mean_atol
    )
    ref_variance = np.diagonal(ref.cov, axis1=-2, axis2=-1)
    np.testing.assert_allclose(
        np.asarray(dist.variance()).reshape(B, -1), ref_variance, rtol=1e-5, atol=1e-7
    )
    cov_atol = 1e-6 * max(1.0, np.abs(ref.cov).max())
    np.testing.assert_allclose(_flat_covariance(dist, B), ref.cov, rtol=1e-5, atol=cov_atol)
    if case.parts_covariance is not None:
        np.testing.assert_allclose(
            case.parts_covariance(head, params), ref.cov, rtol=1e-5, atol=cov_atol
        )

    # Sample moments.
    antithetic = SAMPLING[sampling]
    samples = np.asarray(case.sample(head, params, NUM_SAMPLES, 1234, antithetic))
    assert samples.shape == (NUM_SAMPLES, B) + event_shape
    if antithetic is None:
        antithetic = case.default_antithetic(head)
        explicit = np.asarray(case.sample(head, params, NUM_SAMPLES, 1234, antithetic))
        np.testing.assert_array_equal(samples, explicit, err_msg="default != its explicit value")
    samples = samples.astype(np.float64).reshape(NUM_SAMPLES, B, event_size)
    mean_hat = samples.mean(axis=0)
    rounding = 1e-5 * (1.0 + np.abs(ref.mean) + np.sqrt(ref_variance))
    n_eff = NUM_SAMPLES // 2 if antithetic else NUM_SAMPLES
    k_sigma = _k_sigma(ref.cov.size)
    if antithetic and case.antithetic_mean_exact:  # mirrored pairs: the sample mean is the mean
        mean_bound = rounding
    else:
        mean_bound = k_sigma * np.sqrt(ref_variance / n_eff) + rounding
    mean_error = np.abs(mean_hat - ref.mean)
    assert np.all(mean_error <= mean_bound), (
        f"sample mean off by up to {np.max(mean_error / mean_bound):.2f} x its bound"
    )
    deviations = samples - mean_hat
    cov_hat = np.einsum("nbi,nbj->bij", deviations, deviations) / (NUM_SAMPLES - 1)
    cov_bound = k_sigma * np.sqrt(ref.cov_estimator_variance() / n_eff) + cov_atol
    cov_error = np.abs(cov_hat - ref.cov)
    assert np.all(cov_error <= cov_bound), (
        f"sample covariance off by up to {np.max(cov_error / cov_bound):.2f} x its bound"
    )
