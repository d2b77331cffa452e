"""The figures of the documentation, made by the library at every docs build (docs/hooks.py).

Nothing here is drawn by hand: every figure is a `tfp_seg.plots` figure of samples drawn by the
library's heads and models from the built-in benchmark (`tfp_seg.data.ambiguous_shapes`), whose
exact label distribution is known, so the pictures in the guides show what the current code
produces. Everything is small on purpose (32x32 images; about a minute on two CPU cores):

- `<head>_samples.png` for the SSN, heteroscedastic and mixture heads: the head's
  distribution *fitted to one test image's exact label distribution*. The packed parameters
  `[1, H, W, head.params_size]` are a free variable, trained (Adam, 400 steps) on the head's
  own default loss with labels drawn from the exact modes; no network is involved, so the
  figure shows what the head's family of distributions can represent of this ambiguity.
- `prob_unet_samples.png`: a Probabilistic U-Net (U-Net(8, depth 2), latent_dim 4) trained
  for 160 steps on that image, its labels drawn from the exact distribution (its latent acts
  through a network, so there are no free parameters to fit).
- `ssn_uncertainty.png`, `ssn_reliability.png`: an SSN model (U-Net(8, depth 2), R = 6)
  trained for `--epochs` on the training split, read out on the test split.

Samples of fitted distributions come with their D_GED^2 against the exact distribution (32
samples), also in `figures.json`. docs/performance.md has the numbers of full training runs.

```none
data_annotations.png   a test image and its 4 sampled annotations ("raters")
data_modes.png         the same image and its exact label distribution (modes, weights)
<head>_samples.png     image | 4 annotations | 8 samples     (ssn, heteroscedastic, mixture,
                                                              prob_unet)
ssn_uncertainty.png    SSN model: P(class), predictive entropy, mutual information
ssn_reliability.png    SSN model: reliability diagram over the test pixels
figures.json           settings; per head: D_GED^2 of its samples, the error of its mean
                       probabilities and of its label samples' frequencies against the exact
                       per-pixel marginals (ambiguous pixels); seconds per figure
```

Run: `python docs/make_figures.py --out docs/figures` (the docs build does it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import numpy as np

CLASS_NAMES = ("background", "class A", "class B")
LABELS = {
    "ssn": "SSN (low-rank logits, R = 6)",
    "heteroscedastic": "Heteroscedastic logits",
    "mixture": "Mixture of 3 low-rank components (R = 4)",
    "prob_unet": "Probabilistic U-Net (latent_dim = 4)",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/figures", help="folder for the PNG files")
    parser.add_argument("--epochs", type=int, default=16, help="epochs of the SSN model")
    parser.add_argument("--image-size", type=int, default=32, help="image size (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_head(name: str, num_classes: int):
    """The head of a figure."""
    import tfp_seg

    if name == "ssn":
        return tfp_seg.layers.LowRankLogits(num_classes, rank=6)
    if name == "heteroscedastic":
        return tfp_seg.layers.HeteroscedasticLogits(num_classes)
    return tfp_seg.layers.MixtureLowRankLogits(num_classes, num_components=3, rank=4)


def fit_head(head, modes, weights, *, steps: int = 400, batch: int = 16, seed: int = 0):
    """Packed parameters `[1, H, W, P]` of `head` fitted to the distribution `(modes, weights)`.

    Minimises the head's default loss over labels drawn from the exact modes; the parameters
    start at the head's bias (zero features) plus a little noise.
    """
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    size = modes.shape[1:]
    start = head(tf.zeros((1, *size, 4)))  # builds the head: its bias is the starting point
    params = tf.Variable(start + 0.1 * tf.random.stateless_normal(start.shape, [seed, 1]))
    loss = head.default_loss(num_samples=16)
    optimizer = keras.optimizers.Adam(0.05)

    @tf.function
    def step(labels):
        with tf.GradientTape() as tape:
            value = loss(labels, tf.repeat(params, tf.shape(labels)[0], axis=0))
        optimizer.apply_gradients([(tape.gradient(value, params), params)])
        return value

    for _ in range(steps):
        labels = modes[rng.choice(len(weights), size=batch, p=weights)]
        step(tf.constant(labels, tf.int32))
    return tf.convert_to_tensor(params)


def train_prob_unet(image, modes, weights, num_classes: int, *, seed: int = 0):
    """A small Probabilistic U-Net trained on one image, labels from its exact distribution."""
    import keras

    import tfp_seg

    rng = np.random.default_rng(seed)
    n = 16 * 20
    labels = modes[rng.choice(len(weights), size=n, p=weights)].astype(np.int32)
    images = np.repeat(image[None], n, axis=0)
    model = tfp_seg.models.ProbabilisticUNet(
        num_classes,
        latent_dim=4,
        backbone=tfp_seg.models.UNet(base_filters=8, depth=2),
        encoder_filters=(8, 16, 32),
        encoder_convs_per_block=1,
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(images, labels, batch_size=16, epochs=8, verbose=0)
    return model


def marginal_errors(head, params, marginals, seed: int) -> dict:
    """Mean |error| against the exact per-pixel marginals, over the ambiguous pixels (max
    marginal < 0.9), of the head's mean probabilities and of its label samples' frequencies."""
    ambiguous = marginals.max(axis=-1) < 0.9
    probs = np.asarray(head.mean_probabilities(params, 256, seed=seed))[0]
    maps = np.asarray(head.sample_labels(params, 256, seed=seed))[:, 0]
    freqs = np.stack([(maps == c).mean(axis=0) for c in range(marginals.shape[-1])], axis=-1)
    return {
        "mean_probabilities": round(float(np.abs(probs - marginals)[ambiguous].mean()), 4),
        "label_samples": round(float(np.abs(freqs - marginals)[ambiguous].mean()), 4),
    }


def most_ambiguous(test) -> int:
    """The test image whose exact label distribution has the most modes."""
    return int(np.argmax([len(test.modes_of(i)[1]) for i in range(len(test))]))


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    import keras
    import matplotlib.pyplot as plt

    import tfp_seg

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".complete").unlink(missing_ok=True)
    keras.utils.set_random_seed(args.seed)  # the script, not the library, fixes global seeds
    began = time.perf_counter()

    data = tfp_seg.data.ambiguous_shapes(num_images=192, image_size=args.image_size, seed=args.seed)
    train, _, test = data.split((0.8, 0.1, 0.1))
    c = data.num_classes
    i = most_ambiguous(test)
    image, annotations = test.images[i], test.annotations[i]
    modes, weights = test.modes_of(i)
    record: dict = {"image_size": args.image_size, "test_image": i, "num_modes": len(weights)}
    marginals = test.marginals()[i]
    record.update(ged={}, marginal_error={}, seconds={})

    def save(fig, name):
        fig.savefig(out / name, dpi=100, facecolor="white")
        plt.close(fig)

    def ged(maps):
        return float(
            tfp_seg.metrics.generalized_energy_distance(maps, modes, c, reference_weights=weights)
        )

    save(
        tfp_seg.plots.plot_samples_grid(
            image,
            annotations,
            class_names=CLASS_NAMES,
            title="A test image of the built-in data and its 4 sampled annotations",
        ),
        "data_annotations.png",
    )
    order = np.argsort(-weights)[:8]
    fig = tfp_seg.plots.plot_samples_grid(
        image,
        samples=modes[order],
        class_names=CLASS_NAMES,
        title=f"Its exact label distribution: the {min(8, len(weights))} most probable of "
        f"{len(weights)} modes",
    )
    for ax in fig.axes:  # the grid labels its second row "model samples": these are modes
        if ax.get_title().startswith("sample "):
            k = int(ax.get_title().split()[1]) - 1
            ax.set_title(f"w = {weights[order[k]]:.3f}", fontsize=10)
        if ax.get_ylabel():
            ax.set_ylabel("exact modes", fontsize=11, fontweight="bold")
    save(fig, "data_modes.png")

    for name in ("ssn", "heteroscedastic", "mixture", "prob_unet"):
        start = time.perf_counter()
        if name == "prob_unet":
            model = train_prob_unet(image, modes, weights, c, seed=args.seed)
            maps = np.asarray(model.sample(image[None], 32, seed=args.seed))[:, 0]
            how = "trained 160 steps on this image"
        else:
            head = make_head(name, c)
            params = fit_head(head, modes, weights, seed=args.seed)
            maps = np.asarray(head.sample_labels(params, 32, seed=args.seed))[:, 0]
            how = "fitted to this image's exact label distribution"
            record["marginal_error"][name] = marginal_errors(head, params, marginals, args.seed)
        record["ged"][name] = round(ged(maps), 4)
        save(
            tfp_seg.plots.plot_samples_grid(
                image,
                annotations,
                maps[:8],
                class_names=CLASS_NAMES,
                title=f"{LABELS[name]}, {how}: 8 samples "
                f"(D²_GED = {record['ged'][name]:.3f} over 32 samples)",
            ),
            f"{name}_samples.png",
        )
        record["seconds"][name] = round(time.perf_counter() - start, 1)
        print(f"{name}: D2_GED {record['ged'][name]}, {record['seconds'][name]} s", flush=True)

    start = time.perf_counter()
    model = tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=8, depth=2), make_head("ssn", c)
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="auto")
    model.fit(
        train.to_dataset(batch_size=16, annotation="random", seed=args.seed),
        epochs=args.epochs,
        verbose=0,
    )
    probs = np.asarray(model.probability_samples(test.images, 16, seed=args.seed))
    maps_u = tfp_seg.uncertainty.uncertainty_maps(probs[:, i])
    save(
        tfp_seg.plots.plot_uncertainty_maps(
            image,
            probs[:, i].mean(axis=0),
            maps_u["predictive_entropy"],
            maps_u["mutual_information"],
            class_names=CLASS_NAMES,
            title=f"SSN model after {args.epochs} epochs: mean probabilities, total "
            "uncertainty, sample disagreement",
        ),
        "ssn_uncertainty.png",
    )
    reliability = tfp_seg.metrics.reliability_diagram_data(probs.mean(axis=0), test.marginals())
    save(
        tfp_seg.plots.plot_reliability_diagram(
            reliability, title=f"SSN model after {args.epochs} epochs, test pixels"
        ),
        "ssn_reliability.png",
    )
    record["seconds"]["ssn_model"] = round(time.perf_counter() - start, 1)
    record["seconds"]["total"] = round(time.perf_counter() - began, 1)
    print(f"ssn model: {record['seconds']['ssn_model']} s", flush=True)

    (out / "figures.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / ".complete").touch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
