"""Fake models for the evaluation tests.

`NoiseSampler` and `RaterSampler` implement only the Sampler base's one-batch hook, so the
public `sample_logits` (batches, seeds per batch, argument checks) is the library's own: an
evaluation that streams must give what the samples of one `sample_logits(all, N, seed,
batch_size)` call give.
"""

import numpy as np
import tensorflow as tf

from tfp_seg import _seeds
from tfp_seg.models.sampling import Sampler


def _seed(seed):
    return (
        _seeds.stateless_seed(seed) if seed is not None else tf.cast(_seeds.draw_seed(), tf.int64)
    )


class NoiseSampler(Sampler):
    """Logits `bias(image) + pixel_scale * eps + image_scale * z`: `eps` per pixel and class,
    `z` per sample and class (shared by the pixels of one image, so whole label maps differ
    between samples), both standard normal and seeded by the batch's seed."""

    def __init__(self, num_classes, pixel_scale=1.5, image_scale=2.0):
        self.num_classes = num_classes
        self.pixel_scale, self.image_scale = pixel_scale, image_scale

    def _sample_logits_tensor(self, images, num_samples, seed=None, antithetic=False):
        seed = _seed(seed)
        b, h, w = images.shape[:3]
        c = self.num_classes
        eps = tf.random.stateless_normal([num_samples, b, h, w, c], seed)
        z = tf.random.stateless_normal([num_samples, b, 1, 1, c], _seeds.split_seed(seed, 1))
        bias = tf.cast(images[None, ..., :1], tf.float32) * tf.linspace(0.0, 3.0, c)
        return bias + self.pixel_scale * eps + self.image_scale * z


class RaterSampler(Sampler):
    """Draws each sample as one of the image's K raters, uniformly: exactly the raters'
    empirical distribution. The images carry the raters' label maps as channels
    (`[B, H, W, K]` floats, see `rater_images`)."""

    def __init__(self, num_classes):
        self.num_classes = num_classes

    def _sample_logits_tensor(self, images, num_samples, seed=None, antithetic=False):
        b, k = images.shape[0], images.shape[-1]
        pick = tf.random.stateless_uniform(
            [num_samples, b], _seed(seed), minval=0, maxval=k, dtype=tf.int32
        )
        maps = tf.cast(tf.transpose(images, [0, 3, 1, 2]), tf.int32)  # [b, K, H, W]
        index = tf.stack([tf.broadcast_to(tf.range(b), [num_samples, b]), pick], axis=-1)
        labels = tf.gather_nd(maps, index)  # [N, b, H, W]
        return 10.0 * tf.one_hot(labels, self.num_classes)


def rater_images(annotations):
    """`[B, K, H, W]` label maps -> `[B, H, W, K]` float32 images for `RaterSampler`."""
    return np.moveaxis(np.asarray(annotations), 1, -1).astype(np.float32)


class PerImageSampler:
    """Not a Sampler: ignores `seed` and draws every image's samples from its own id (channel
    1 of the image), so its samples do not depend on how the images are batched."""

    def __init__(self, num_classes):
        self.num_classes = num_classes

    def sample_logits(self, x, num_samples, seed=None, batch_size=None):
        x = np.asarray(x)
        out = [
            np.random.default_rng([int(image[0, 0, 1]), 7]).normal(
                size=(num_samples,) + image.shape[:2] + (self.num_classes,)
            )
            + 2.0 * image[None, ..., :1]
            for image in x
        ]
        return np.stack(out, axis=1).astype(np.float32)


def blob_annotations(rng, num_images, num_raters, size, num_classes, jitter=2):
    """`[B, K, H, W]` int: one disc per image with a random class, each rater's radius and
    centre jittered (raters disagree at the boundary); some raters draw nothing."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((num_images, num_raters, size, size), np.int64)
    for i in range(num_images):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, size=2)
        radius = rng.uniform(size * 0.15, size * 0.35)
        cls = rng.integers(1, num_classes)
        for k in range(num_raters):
            if rng.random() < 0.15:
                continue  # an empty annotation
            dy, dx = rng.uniform(-jitter, jitter, size=2)
            r = radius + rng.uniform(-jitter, jitter)
            out[i, k][(yy - cy - dy) ** 2 + (xx - cx - dx) ** 2 <= r**2] = cls
    return out
