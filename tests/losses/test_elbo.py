"""`ELBO` / `GECO` on volumes `[B, D, H, W]` and on label sets `[B, K, *S]`: the reconstruction
against a NumPy cross-entropy, per-pixel means with ignored voxels, the KL against the Gaussian
closed form, and clear errors (issue 17, the Probabilistic U-Net's losses).

(The 2D ELBO inside the model is tested in tests/models/test_prob_unet.py.)"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_seg.losses import ELBO, GECO

tfd = tfp.distributions
B, K, C = 2, 3, 4
SPATIAL = {2: (4, 5), 3: (3, 4, 5)}


def _logits(spatial, seed=0):
    return np.random.default_rng(seed).normal(size=(B, *spatial, C)).astype("float32")


def _labels(spatial, seed=1, raters=None):
    shape = (B,) + ((raters,) if raters else ()) + spatial
    return np.random.default_rng(seed).integers(0, C, size=shape).astype("int32")


def _numpy_ce(labels, logits, ignore=None, weights=None):
    """Summed cross-entropy `[B]` of label maps `[B, *S]` under logits `[B, *S, C]`."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    valid = np.ones(labels.shape, bool) if ignore is None else labels != ignore
    safe = np.where(valid, labels, 0)
    picked = np.take_along_axis(log_p, safe[..., None], -1)[..., 0]
    w = valid.astype(float) * (1.0 if weights is None else np.asarray(weights)[safe])
    return -(picked * w).reshape(len(labels), -1).sum(1), valid.reshape(len(labels), -1).sum(1)


def _gaussians(seed=2, latent=3):
    rng = np.random.default_rng(seed)
    mq, mp = rng.normal(size=(2, B, latent))
    sq, sp = rng.uniform(0.3, 2.0, size=(2, B, latent))
    q = tfd.MultivariateNormalDiag(mq.astype("float32"), sq.astype("float32"))
    p = tfd.MultivariateNormalDiag(mp.astype("float32"), sp.astype("float32"))
    kl = np.sum(np.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5, axis=-1)
    return q, p, kl


@pytest.mark.parametrize("dims", [2, 3])
def test_the_reconstruction_is_the_summed_cross_entropy(dims):
    spatial = SPATIAL[dims]
    logits, labels = _logits(spatial), _labels(spatial)
    labels.reshape(-1)[::7] = 255  # some ignored voxels
    weights = [1.0, 2.0, 0.5, 1.5]
    summed = ELBO(ignore_label=255, class_weights=weights).reconstruction_loss(labels, logits)
    expected, counts = _numpy_ce(labels, logits, 255, weights)
    np.testing.assert_allclose(summed.numpy(), expected, rtol=1e-5)
    mean = ELBO(ignore_label=255, class_weights=weights, reconstruction="mean")
    np.testing.assert_allclose(
        mean.reconstruction_loss(labels, logits).numpy(), expected / counts, rtol=1e-5
    )
    # [B, *S, 1] is the same label map
    np.testing.assert_allclose(
        ELBO(ignore_label=255, class_weights=weights).reconstruction_loss(
            labels[..., None], logits
        ),
        summed,
        rtol=1e-6,
    )


@pytest.mark.parametrize("reconstruction", ["sum", "mean"])
@pytest.mark.parametrize("dims", [2, 3])
def test_a_label_set_is_the_mean_over_its_raters(dims, reconstruction):
    spatial = SPATIAL[dims]
    logits, label_set = _logits(spatial), _labels(spatial, raters=K)
    label_set[:, 1].reshape(-1)[::3] = 255
    elbo = ELBO(ignore_label=255, reconstruction=reconstruction)
    got = elbo.reconstruction_loss(label_set, logits).numpy()
    per_rater = []
    for k in range(K):
        ce, counts = _numpy_ce(label_set[:, k], logits, 255)
        per_rater.append(ce / counts if reconstruction == "mean" else ce)
    np.testing.assert_allclose(got, np.mean(per_rater, axis=0), rtol=1e-5)
    # one rater: the label map itself
    np.testing.assert_allclose(
        elbo.reconstruction_loss(label_set[:, :1], logits).numpy(),
        elbo.reconstruction_loss(label_set[:, 0], logits).numpy(),
        rtol=1e-6,
    )


def test_the_kl_is_the_gaussian_closed_form():
    q, p, kl = _gaussians()
    np.testing.assert_allclose(ELBO.kl_divergence(q, p).numpy(), kl, rtol=1e-5)
    spatial = SPATIAL[3]
    logits, labels = _logits(spatial), _labels(spatial)
    terms = ELBO(beta=0.5)(labels, logits, q, p)
    rec, _ = _numpy_ce(labels, logits)
    np.testing.assert_allclose(float(terms["kl"]), kl.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(terms["loss"]), rec.mean() + 0.5 * kl.mean(), rtol=1e-5)


def test_geco_on_volumes():
    q, p, kl = _gaussians()
    spatial = SPATIAL[3]
    logits, labels = _logits(spatial), _labels(spatial, raters=2)
    geco = GECO(target=1.0, alpha=0.5, initial_multiplier=2.0)
    elbo = ELBO(geco=geco, reconstruction="mean")
    terms = elbo(labels, logits, q, p, training=True)
    rec = float(terms["reconstruction"])
    assert rec > 1.0  # the constraint is violated: lambda grows after the step
    np.testing.assert_allclose(float(terms["loss"]), kl.mean() + 2.0 * (rec - 1.0), rtol=1e-5)
    assert float(geco.multiplier) > 2.0
    np.testing.assert_allclose(float(geco.constraint_ma), rec - 1.0, rtol=1e-5)


def test_bad_labels_name_the_argument_and_layout():
    spatial = SPATIAL[3]
    logits = _logits(spatial)
    elbo = ELBO()
    with pytest.raises(ValueError, match=r"`labels` shape \(2, 3, 4, 4\) must equal the \[B, D"):
        elbo.reconstruction_loss(_labels((3, 4, 4)), logits)
    with pytest.raises(ValueError, match=r"`labels` must be one map \[B, D, H, W\]|`labels`"):
        elbo.reconstruction_loss(_labels(spatial)[:, 0], logits)
    with pytest.raises(ValueError, match=r"soft labels \[B, D, H, W, C\]"):
        elbo.reconstruction_loss(np.full((B, *spatial, C), 1.0 / C, "float32"), logits)
    with pytest.raises(ValueError, match=r"`logits` must have rank 4 \(\[B, H, W, C\]\) or 5"):
        elbo.reconstruction_loss(_labels(spatial), logits[..., None])
    with pytest.raises(ValueError, match="`class_weights` must have one entry per class"):
        ELBO(class_weights=[1.0, 1.0]).reconstruction_loss(_labels(spatial), logits)
    with pytest.raises(tf.errors.InvalidArgumentError, match="values outside"):
        elbo.reconstruction_loss(_labels(spatial) + C, logits)
