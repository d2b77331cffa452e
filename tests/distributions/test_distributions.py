import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_seg import distributions as dists

tfd = tfp.distributions


def _params(rng, b=2, h=3, w=2, c=3, r=2, d=None):
    """Low-rank parameters over `S = (h, w)`, or the volume `(d, h, w)` when `d` is given."""
    spatial = (h, w) if d is None else (d, h, w)
    loc = rng.normal(size=(b, *spatial, c)).astype("float32")
    factor = (0.5 * rng.normal(size=(b, *spatial, c, r))).astype("float32")
    diag = rng.uniform(0.1, 1.0, size=(b, *spatial, c)).astype("float32")
    return loc, factor, diag


def _dense(loc, factor, diag):
    b = loc.shape[0]
    p = factor.reshape(b, -1, factor.shape[-1]).astype("float64")
    cov = p @ np.swapaxes(p, 1, 2) + np.stack([np.diag(d) for d in diag.reshape(b, -1)])
    return cov


@pytest.mark.parametrize("depth", [None, 2], ids=["image", "volume"])
def test_matches_dense_reference(rng, depth):
    loc, factor, diag = _params(rng, d=depth)
    event = loc.shape[1:]
    dist = dists.low_rank_logits(loc, factor, diag)
    assert dist.batch_shape == [2] and dist.event_shape == event
    assert dist.spatial_dims == len(event) - 1
    cov = _dense(loc, factor, diag)
    ref = tfd.MultivariateNormalTriL(loc.reshape(2, -1), np.linalg.cholesky(cov).astype("float32"))
    x = dist.sample(5, seed=[1, 2])
    assert x.shape == (5, 2) + event
    np.testing.assert_allclose(
        dist.log_prob(x).numpy(), ref.log_prob(tf.reshape(x, [5, 2, -1])).numpy(), rtol=1e-5
    )
    # Batch slicing goes through the parameters' event ranks ([*S, C], [*S, C, R]).
    first = dist[:1]
    assert first.batch_shape == [1] and first.event_shape == event
    np.testing.assert_allclose(first.log_prob(x[:, :1]).numpy(), dist.log_prob(x)[:, :1], rtol=1e-6)
    np.testing.assert_allclose(dist.covariance().numpy(), cov, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dist.mean().numpy(), loc)
    np.testing.assert_allclose(
        dist.variance().numpy().reshape(2, -1),
        np.stack([np.diag(c) for c in cov]),
        rtol=1e-5,
    )
    np.testing.assert_allclose(dist.stddev().numpy() ** 2, dist.variance().numpy(), rtol=1e-5)


def test_log_prob_matches_scipy_density(rng):
    from scipy.stats import multivariate_normal

    loc, factor, diag = _params(rng, b=1)
    dist = dists.low_rank_logits(loc, factor, diag)
    x = rng.normal(size=(1, 3, 2, 3)).astype("float32")
    expected = multivariate_normal(loc.reshape(-1), _dense(loc, factor, diag)[0]).logpdf(
        x.reshape(-1)
    )
    np.testing.assert_allclose(dist.log_prob(x).numpy()[0], expected, rtol=1e-5)


@pytest.mark.parametrize("antithetic", [False, True])
def test_export_safe_sampler_moments(rng, antithetic):
    loc, factor, diag = _params(rng, b=1, h=2, w=2, c=2, r=3)
    n = 20000
    s = dists.sample_low_rank(
        tf.constant(loc), tf.constant(factor), tf.constant(diag), n, seed=7, antithetic=antithetic
    ).numpy()
    assert s.shape == (n, 1, 2, 2, 2)
    flat = s.reshape(n, -1).astype("float64")
    cov = _dense(loc, factor, diag)[0]
    sd = np.sqrt(np.diag(cov))
    # Mean: each coordinate within 5 standard errors (exact for antithetic pairs).
    np.testing.assert_array_less(np.abs(flat.mean(0) - loc.reshape(-1)), 5 * sd / np.sqrt(n))
    # Covariance: each entry within 5 standard errors of the sample covariance,
    # se(S_ij) ~ sqrt((S_ii S_jj + S_ij^2) / n); antithetic pairs halve the effective n.
    n_eff = n // 2 if antithetic else n
    sample_cov = np.cov(flat, rowvar=False)
    se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n_eff)
    np.testing.assert_array_less(np.abs(sample_cov - cov), 5 * se)


def test_antithetic_pairs_mirror_the_mean(rng):
    loc, factor, diag = _params(rng)
    s = dists.sample_low_rank(loc, factor, diag, 6, seed=3, antithetic=True).numpy()
    np.testing.assert_allclose(s[:3] + s[3:], 2 * loc[None].repeat(3, 0), atol=1e-5)


def test_stateless_seed_reproducible_and_distinct(rng):
    loc, factor, diag = _params(rng)
    a = dists.sample_low_rank(loc, factor, diag, 4, seed=11).numpy()
    b = dists.sample_low_rank(loc, factor, diag, 4, seed=11).numpy()
    c = dists.sample_low_rank(loc, factor, diag, 4, seed=12).numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_fixed_noise_gives_the_formula(rng):
    loc, factor, diag = _params(rng, b=1)
    z = rng.normal(size=(2, 1, 2)).astype("float32")
    eps = rng.normal(size=(2, 1, 3, 2, 3)).astype("float32")
    s = dists.sample_low_rank(loc, factor, diag, 2, noise=(z, eps)).numpy()
    expected = loc[None] + np.einsum("bhwcr,nbr->nbhwc", factor, z) + np.sqrt(diag)[None] * eps
    np.testing.assert_allclose(s, expected, rtol=1e-5, atol=1e-6)


def test_diagonal_logits_and_sampler(rng):
    loc = rng.normal(size=(1, 2, 2, 3)).astype("float32")
    scale = rng.uniform(0.5, 1.5, size=(1, 2, 2, 3)).astype("float32")
    d = dists.diagonal_logits(loc, scale)
    assert d.event_shape == [2, 2, 3]
    s = dists.sample_diagonal(loc, scale, 20000, seed=1).numpy()
    np.testing.assert_array_less(np.abs(s.mean(0) - loc), 5 * scale / np.sqrt(20000))
    np.testing.assert_allclose(s.std(0), scale, rtol=0.05)


def test_bad_shapes_name_the_argument(rng):
    loc, factor, diag = _params(rng)
    with pytest.raises(ValueError, match="`loc`"):
        dists.low_rank_logits(loc[0], factor, diag)
    with pytest.raises(ValueError, match="`cov_factor`"):
        dists.low_rank_logits(loc, factor[..., 0], diag)
    with pytest.raises(ValueError, match="`cov_diag`"):
        dists.low_rank_logits(loc, factor, diag[:, :2])
    with pytest.raises(ValueError, match="`num_samples`"):
        dists.sample_low_rank(loc, factor, diag, 0)
    with pytest.raises(ValueError, match="even"):
        dists.sample_low_rank(loc, factor, diag, 3, antithetic=True)


def test_validate_args_rejects_non_finite(rng):
    loc, factor, diag = _params(rng)
    loc[0, 0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="`loc`"):
        dists.low_rank_logits(loc, factor, diag, validate_args=True)


def test_volume_parameters_of_the_wrong_rank_name_the_argument(rng):
    loc, factor, diag = _params(rng, d=2)  # [B, D, H, W, C]
    with pytest.raises(
        ValueError, match=r"`loc` must have rank 4 \(\[B, H, W, C\]\) or 5 \(\[B, D"
    ):
        dists.low_rank_logits(loc[None], factor, diag)
    with pytest.raises(ValueError, match=r"`cov_factor` must have rank 6 \(\[B, D, H, W, C, R\]"):
        dists.low_rank_logits(loc, factor[..., 0], diag)
    with pytest.raises(ValueError, match=r"`cov_diag` must have rank 5 \(\[B, D, H, W, C\]"):
        dists.sample_low_rank_labels(loc, factor, diag[0], 2)
    with pytest.raises(ValueError, match=r"`scale` must have rank 5"):
        dists.diagonal_logits(loc, diag[0])
    with pytest.raises(ValueError, match=r"`loc` must have rank 5 \(\[B, K, H, W, C\]\) or 6"):
        dists.mixture_low_rank_logits(np.zeros((2, 1), "float32"), loc[0], factor, diag)
    mixture = dists.mixture_low_rank_logits(
        np.zeros((2, 1), "float32"), loc[:, None], factor[:, None], diag[:, None]
    )
    assert mixture.batch_shape == [2] and mixture.event_shape == loc.shape[1:]
    np.testing.assert_allclose(
        mixture.log_prob(loc).numpy(),
        dists.low_rank_logits(loc, factor, diag).log_prob(loc),
        rtol=1e-5,
    )
