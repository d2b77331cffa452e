"""SSN loss, forward + backward to the head's outputs: tfp_seg against the official PyTorch SSN.

The peer is the reference implementation of Monteiro et al. (2020),
github.com/biomedia-mira/stochastic_segmentation_networks. Its side of the comparison runs
the peer's own code, taken from a local copy (`--peer-repo`: a checkout, or a bare git
directory read with `git show HEAD:...`) into a temporary folder at run time and imported
there by a Python with PyTorch (`--peer-python`); none of it is part of this repository:

```none
peer     the head outputs mean [B, C, H, W], log_cov_diag [B, C, H, W], cov_factor [B, C*R, H, W]
         (leaf tensors) -> StochasticDeepMedic.forward after its three 1x1 convolutions (exp,
         the ROI mask, here all ones, the reshapes) -> td.LowRankMultivariateNormal ->
         ReshapedDistribution -> StochasticSegmentationNetworkLossMCIntegral(M) (antithetic
         pairs) -> loss.backward() to the three head outputs
tfp_seg  params [B, H, W, C (2 + R)] (the packed head output) ->
         StochasticSegmentationNLL(head, M, marginal_weight=0, normalize="none") (the paper's
         estimator, the default path: fused, 2 classes through the logit difference,
         chunk_size="auto", antithetic pairs) -> gradient w.r.t. params
```

Both compute `mean_b [ -logsumexp_m( sum_i log softmax(eta_i^m)[y_i] ) + log M ]`. The
peer's network is replaced by a stand-in whose forward returns its input (a `[B, 1, H, W]`
zero image, which the peer code passes through a ReLU), and its three convolutions by modules
returning the given head outputs, so the measured code starts at the head's outputs on both
sides. The peer adds its epsilon twice (`(exp(raw) + eps) * mask + eps` with a mask of ones),
so the tfp_seg head uses `epsilon = 2e-5`: the same covariance `P P^T + diag(exp(raw) + 2e-5)`.

The parameterisations map exactly (`to_ours_params`): the peer's event is flattened
class-major `(c, h, w)` and its factor channel of `(c, r)` is `r * C + c`; tfp_seg's params
hold, per pixel, `[mu (C) | raw (C) | P (C, R) row-major]`. Once per run (`--check-shape`) both
sides compute the loss and its gradient on the same head outputs with the same noise (the
peer's draws are recorded and passed to `tfp_seg.losses.chunked.sampled_nll_terms(noise=...)`,
the kernels the loss runs): the values must agree to `rtol` 1e-4 and the gradients to 1e-4 of
their largest entry, which shows that the two time the same computation. (Fixed noise is per
class, so the check runs the per-class kernels; with drawn noise a 2-class loss samples the
logit difference, one normal per pixel: the same distribution of samples, checked against the
per-class kernels on matched noise and against closed forms in tests/losses/test_planar.py.)

Each measurement is one fresh process (`_common.child_median_ms`: median of `--repeats` calls
after `--warmup`; `_common.peak_rss_increase_mib`: peak RSS above the RSS before a call,
median of 3, with `MEMORY_CHILD_ENV`), both sides with `--threads` (2) intra- and inter-op
threads, the same shapes, M and R. Timing children run in turn per shape (peer, then ours),
so machine load between them shifts the ratio; repeat runs to see the spread.

Run:
    python benchmarks/bench_vs_peer.py --peer-repo PATH --peer-python PATH [--quick]
    python benchmarks/bench_vs_peer.py --ours-only [--shapes 8,2,20,128x128 ...]

Getting the peer: `git clone https://github.com/biomedia-mira/stochastic_segmentation_networks`
(or any copy of it); a CPU PyTorch: `python3 -m venv /tmp/torchvenv &&
/tmp/torchvenv/bin/pip install torch==2.13.0` (from a CPU wheel or PyTorch's CPU index; plain
`pip install torch` from PyPI brings a multi-GB CUDA build).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

# (B, C, M, H, W) of issue 21 / issue 17
SHAPES = [
    (8, 2, 20, 64, 64),
    (8, 2, 20, 128, 128),
    (8, 2, 20, 256, 256),
    (8, 2, 10, 128, 128),
    (8, 2, 50, 128, 128),
    (8, 2, 100, 128, 128),
    (2, 19, 20, 128, 128),
]
QUICK_SHAPES = [(2, 2, 4, 32, 32), (2, 3, 4, 32, 32)]
PEER_EPSILON = 1e-5  # StochasticDeepMedic's default, added twice with the ROI mask
# where each needed peer file goes in the temporary folder: its imports are
# `from .deepmedic import ...` (package `models`) and `from trainer.distributions import ...`
PEER_FILES = {
    "models/stochastic_deepmedic.py": "ssn/models/stochastic_deepmedic.py",
    "trainer/distributions.py": "ssn/trainer/distributions.py",
    "trainer/losses.py": "ssn/trainer/losses.py",
}
# Written by this script, not the peer's code: the network in front of the head, replaced by
# the identity (the peer's `models/deepmedic.py` needs numpy and builds a DeepMedic).
_NETWORK_STAND_IN = '''"""Stand-in for the peer's DeepMedic (written by tfp_seg's bench_vs_peer.py):
its forward returns the features it is given, so that the measured code starts at the head."""
import torch.nn as nn

SCALE_FACTORS = ((1, 1),)
FEATURE_MAPS = (1,)
FULLY_CONNECTED = ()
DROPOUT = ()


class DeepMedic(nn.Module):
    def __init__(self, input_channels, num_classes, scale_factors, feature_maps, *args):
        super().__init__()
        self.dim = len(scale_factors[0])

    def forward(self, image, **kwargs):
        return (image,)
'''
HOW_TO_GET = (
    "The peer comparison needs (1) --peer-repo PATH: a copy of "
    "github.com/biomedia-mira/stochastic_segmentation_networks (a checkout or a bare git "
    "directory; e.g. `git clone https://github.com/biomedia-mira/"
    "stochastic_segmentation_networks`), and (2) --peer-python PATH: a Python with PyTorch for "
    "CPU (e.g. `python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install "
    "torch==2.13.0` from a CPU wheel or PyTorch's CPU index, not the CUDA build). "
    "Or run only tfp_seg's side with --ours-only."
)


class PeerMissing(RuntimeError):
    """The peer's code or a Python with PyTorch is not available (the message says which)."""


def parse_shape(text: str):
    """`"B,C,M,HxW"` (or `"B,C,M,H"` for a square) -> `(B, C, M, H, W)`."""
    parts = text.split(",")
    try:
        if len(parts) != 4:
            raise ValueError
        b, c, m = (int(p) for p in parts[:3])
        size = [int(p) for p in parts[3].lower().split("x")]
        if len(size) not in (1, 2) or min(b, c, m, *size) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a shape must be B,C,M,HxW with positive integers (e.g. 8,2,20,128x128); got {text!r}"
        ) from None
    if m % 2 or c < 2:
        raise argparse.ArgumentTypeError(
            f"M must be even (both sides draw antithetic pairs) and C >= 2; got {text!r}"
        )
    return (b, c, m, size[0], size[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/vs_peer.json")
    parser.add_argument("--peer-repo", help="checkout or bare git directory of the peer")
    parser.add_argument("--peer-python", help="a Python interpreter with torch (CPU)")
    parser.add_argument("--ours-only", action="store_true", help="measure tfp_seg's side only")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", help="B,C,M,HxW each")
    parser.add_argument("--rank", type=int, default=10, help="R (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="intra- and inter-op threads")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--check-shape",
        type=parse_shape,
        default=(2, 3, 20, 32, 32),
        help="B,C,M,HxW of the value check (default 2,3,20,32x32)",
    )
    parser.add_argument("--quick", action="store_true", help="2 tiny shapes, 3 repeats")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print op-type time shares of tfp_seg's side at --shapes instead (no peer, no table)",
    )
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.quick:
        args.repeats, args.warmup = 3, 1
    return args


# --- the peer's files ----------------------------------------------------------------------------
def _read_peer_file(repo: str, path: str) -> str:
    """`path` of the peer from a checkout (`repo/path`) or a git directory (`repo` or
    `repo/.git`, read at HEAD)."""
    if os.path.isfile(os.path.join(repo, path)):
        with open(os.path.join(repo, path)) as f:
            return f.read()
    for git_dir in (repo, os.path.join(repo, ".git")):
        if not os.path.isdir(git_dir):
            continue
        proc = subprocess.run(
            ["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            return proc.stdout
    raise PeerMissing(
        f"--peer-repo {repo}: has no {path} (neither a checkout with that file nor a git "
        f"directory holding it at HEAD). {HOW_TO_GET}"
    )


def extract_peer(repo: str | None, dest: str) -> str:
    """Copy the peer's head, distribution and loss code into `dest` (with the network
    stand-in) and return `dest`, the folder the peer child puts on its import path.

    Raises:
      PeerMissing: no `repo`, or it lacks one of `PEER_FILES`.
    """
    if not repo:
        raise PeerMissing(f"no --peer-repo given. {HOW_TO_GET}")
    if not os.path.exists(repo):
        raise PeerMissing(f"--peer-repo {repo}: no such file or directory. {HOW_TO_GET}")
    files = {target: _read_peer_file(repo, source) for target, source in PEER_FILES.items()}
    files["models/deepmedic.py"] = _NETWORK_STAND_IN
    files["models/__init__.py"] = files["trainer/__init__.py"] = ""
    for target, text in files.items():
        path = os.path.join(dest, target)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return dest


def check_peer_python(python: str | None) -> str:
    """The torch version of `python`. Raises `PeerMissing` if it is missing or lacks torch."""
    if not python:
        raise PeerMissing(f"no --peer-python given. {HOW_TO_GET}")
    try:
        proc = subprocess.run(
            [python, "-c", "import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=""),
        )
    except OSError as err:
        raise PeerMissing(f"--peer-python {python}: cannot run it ({err}). {HOW_TO_GET}") from err
    if proc.returncode:
        raise PeerMissing(
            f"--peer-python {python}: `import torch` failed ({proc.stderr.strip()[-300:]}). "
            f"{HOW_TO_GET}"
        )
    return proc.stdout.strip()


# --- layouts: peer <-> tfp_seg -------------------------------------------------------------------
def to_ours_params(mean, log_diag, factor, rank: int):
    """Peer head outputs (`[B, C, H, W]`, `[B, C, H, W]`, `[B, C*R, H, W]`, channel
    `r * C + c`) -> tfp_seg `LowRankLogits` params `[B, H, W, C (2 + R)]` (NumPy arrays)."""
    import numpy as np

    b, c, h, w = mean.shape
    p = factor.reshape(b, rank, c, h, w).transpose(0, 3, 4, 2, 1).reshape(b, h, w, c * rank)
    return np.concatenate([mean.transpose(0, 2, 3, 1), log_diag.transpose(0, 2, 3, 1), p], -1)


def to_peer_layout(params, classes: int, rank: int):
    """Inverse of `to_ours_params`: params (or their gradient) `[B, H, W, C (2 + R)]` ->
    `(mean, log_diag, factor)` in the peer's layouts."""
    b, h, w, _ = params.shape
    c = classes
    mean = params[..., :c].transpose(0, 3, 1, 2)
    log_diag = params[..., c : 2 * c].transpose(0, 3, 1, 2)
    p = params[..., 2 * c :].reshape(b, h, w, c, rank).transpose(0, 4, 3, 1, 2)
    return mean, log_diag, p.reshape(b, rank * c, h, w)


def to_ours_noise(eps_w, eps_d, height: int, width: int):
    """The peer's draws `eps_W [M/2, B, R]`, `eps_D [M/2, B, C*H*W]` (class-major) -> the
    head's `noise=(z [M/2, B, R], eps [M/2, B, H, W, C])`."""
    n, b, size = eps_d.shape
    c = size // (height * width)
    return eps_w, eps_d.reshape(n, b, c, height, width).transpose(0, 1, 3, 4, 2)


# --- the peer's side (runs in --peer-python: torch, no TensorFlow, no numpy) ------------------
def _peer_setup(peer_dir, batch, classes, samples, height, width, rank, seed, threads):
    import torch
    import torch.nn as nn

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    # The peer was written for torch < 1.8, whose distributions did not validate their
    # arguments by default; with validation on, its ReshapedDistribution fails to construct
    # (its `arg_constraints` reads an attribute set after `Distribution.__init__`).
    torch.distributions.Distribution.set_default_validate_args(False)
    sys.path.insert(0, peer_dir)
    from models.stochastic_deepmedic import StochasticDeepMedic
    from trainer.losses import StochasticSegmentationNetworkLossMCIntegral

    class Given(nn.Module):
        """Returns the given head output in place of a 1x1 convolution."""

        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, features):
            return self.value

    torch.manual_seed(seed)  # the sampling noise (the global generator)
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, classes, height, width)
    mean = 0.3 * torch.randn(shape, generator=gen)
    log_diag = 0.3 * torch.randn(shape, generator=gen)
    factor = 0.3 * torch.randn((batch, classes * rank, height, width), generator=gen)
    labels = torch.randint(0, classes, (batch, height, width), generator=gen)
    outputs = [t.requires_grad_() for t in (mean, log_diag, factor)]
    model = StochasticDeepMedic(1, classes, scale_factors=((1, 1),), feature_maps=(1,), rank=rank)
    model.mean_l, model.log_cov_diag_l, model.cov_factor_l = (Given(t) for t in outputs)
    loss_fn = StochasticSegmentationNetworkLossMCIntegral(num_mc_samples=samples)
    image = torch.zeros((batch, 1, height, width))
    mask = torch.ones((batch, height, width))

    def step():
        for t in outputs:
            t.grad = None
        logit_mean, output = model(image, sampling_mask=mask)
        loss = loss_fn(logit_mean, labels, output["distribution"])
        loss.backward()
        return loss

    return step, outputs, labels


def peer_step(peer_dir, batch, classes, samples, height, width, rank, seed=0, threads=2):
    """The peer's forward + backward, a function of no argument (a child's factory)."""
    return _peer_setup(peer_dir, batch, classes, samples, height, width, rank, seed, threads)[0]


def peer_check(peer_dir, out, batch, classes, samples, height, width, rank, seed=0, threads=2):
    """Run the peer's loss once, recording its noise; write inputs, noise, loss and gradients
    to `out` (JSON lists) and return a no-op (a child's factory: `_common.child_median_ms`)."""
    import torch.distributions.lowrank_multivariate_normal as lowrank

    step, outputs, labels = _peer_setup(
        peer_dir, batch, classes, samples, height, width, rank, seed, threads
    )
    drawn, draw = [], lowrank._standard_normal

    def recording(*args, **kwargs):
        drawn.append(draw(*args, **kwargs))
        return drawn[-1]

    lowrank._standard_normal = recording
    try:
        loss = step()
    finally:
        lowrank._standard_normal = draw
    if len(drawn) != 2:
        raise RuntimeError(f"expected 2 noise draws (eps_W, eps_D) in rsample; saw {len(drawn)}")
    record = {"loss": float(loss), "labels": labels.tolist()}
    for name, t in zip(("mean", "log_diag", "factor"), outputs, strict=True):
        record[name] = t.detach().tolist()
        record[name + "_grad"] = t.grad.tolist()
    record["eps_w"], record["eps_d"] = (t.tolist() for t in drawn)
    with open(out, "w") as f:
        json.dump(record, f)
    return lambda: None


# --- tfp_seg's side ------------------------------------------------------------------------------
def _tensorflow(threads: int):
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already ran here (in-process --profile, tests)
        print(
            f"bench_vs_peer: TensorFlow is initialised; it keeps its threads, not {threads}",
            file=sys.stderr,
        )
    return tf


def _our_loss(classes, samples, rank):
    import tfp_seg

    head = tfp_seg.layers.LowRankLogits(classes, rank=rank, epsilon=2 * PEER_EPSILON)
    loss = tfp_seg.losses.StochasticSegmentationNLL(
        head, num_samples=samples, marginal_weight=0.0, normalize="none"
    )
    return head, loss


def ours_step(batch, classes, samples, height, width, rank, seed=0, threads=2):
    """tfp_seg's forward + backward, a function of no argument (a child's factory)."""
    import numpy as np

    tf = _tensorflow(threads)
    head, loss = _our_loss(classes, samples, rank)
    rng = np.random.default_rng(seed)
    size = (batch, height, width)
    params = tf.constant(0.3 * rng.normal(size=size + (head.params_size,)).astype("float32"))
    labels = tf.constant(rng.integers(0, classes, size=size).astype("int32"))
    return _common.loss_gradient_fn(loss, labels, params)


def value_check(args, peer_dir, work_dir) -> dict:
    """The peer's and tfp_seg's loss and gradient on the same head outputs and noise."""
    import numpy as np
    import tensorflow as tf

    from tfp_seg.losses import chunked

    b, c, m, h, w = args.check_shape
    out = os.path.join(work_dir, "check.json")
    kwargs = dict(batch=b, classes=c, samples=m, height=h, width=w, rank=args.rank)
    _common.child_median_ms(
        __file__,
        "peer_check",
        dict(kwargs, peer_dir=peer_dir, out=out, threads=args.threads),
        repeats=1,
        warmup=0,
        python=args.peer_python,
    )
    with open(out) as f:
        record = {k: np.asarray(v) for k, v in json.load(f).items()}
    parts = [record[k].astype("float32") for k in ("mean", "log_diag", "factor")]
    params = tf.constant(to_ours_params(*parts, rank=args.rank))
    labels = tf.constant(record["labels"].astype("int32"))
    z, eps = to_ours_noise(record["eps_w"], record["eps_d"], h, w)
    head, _ = _our_loss(c, m, args.rank)
    with tf.GradientTape() as tape:
        tape.watch(params)
        joint, _ = chunked.sampled_nll_terms(
            head, labels, params, m, antithetic=True, noise=(z, eps)
        )
        ours = tf.reduce_mean(joint)
    grads = to_peer_layout(tape.gradient(ours, params).numpy(), c, args.rank)
    grad_err = max(
        float(np.max(np.abs(g - record[k + "_grad"])) / np.max(np.abs(record[k + "_grad"])))
        for g, k in zip(grads, ("mean", "log_diag", "factor"), strict=True)
    )
    result = {
        "shape": args.check_shape,
        "peer_loss": float(record["loss"]),
        "tfp_seg_loss": float(ours),
        "loss_rel_diff": abs(float(ours) - float(record["loss"])) / abs(float(record["loss"])),
        "grad_max_rel_diff": grad_err,
    }
    print(
        f"value check at B,C,M,H,W = {args.check_shape}, same head outputs and noise: peer "
        f"{result['peer_loss']:.6f}, tfp_seg {result['tfp_seg_loss']:.6f} (relative "
        f"difference {result['loss_rel_diff']:.1e}); gradients: largest difference "
        f"{grad_err:.1e} of the largest entry"
    )
    if not (result["loss_rel_diff"] <= 1e-4 and grad_err <= 1e-4):
        raise RuntimeError(f"the two sides disagree, so the comparison is not fair: {result}")
    return result


def profile_ours(shape, rank: int, threads: int, top: int = 12) -> dict:
    """Op-type time shares of tfp_seg's side (`--profile`): the loss and its gradient as one
    TF1 graph run with `FULL_TRACE` step stats, op times summed over 3 traced runs."""
    import collections
    import time

    import numpy as np

    tf = _tensorflow(threads)
    b, c, m, h, w = shape
    graph = tf.Graph()
    with graph.as_default():
        head, loss = _our_loss(c, m, rank)
        rng = np.random.default_rng(0)
        params = tf.constant(0.3 * rng.normal(size=(b, h, w, head.params_size)).astype("float32"))
        labels = tf.constant(rng.integers(0, c, size=(b, h, w)).astype("int32"))
        value = loss(labels, params)
        fetch = [value, tf.reduce_sum(tf.gradients(value, params)[0])]
    totals, walls = collections.Counter(), []
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    with tf.compat.v1.Session(graph=graph) as sess:
        for _ in range(8):
            start = time.perf_counter()
            sess.run(fetch)
            walls.append(1000.0 * (time.perf_counter() - start))
        for _ in range(3):
            meta = tf.compat.v1.RunMetadata()
            sess.run(fetch, options=options, run_metadata=meta)
            for node in (n for d in meta.step_stats.dev_stats for n in d.node_stats):
                label = node.timeline_label
                op = label.split(" = ")[1].split("(")[0] if " = " in label else node.node_name
                totals[op] += (node.op_end_rel_micros - node.op_start_rel_micros) / 3000.0
    wall = float(np.median(walls[2:]))
    total = sum(totals.values())
    print(
        f"\ntfp_seg at B,C,M,H,W = {shape}: {wall:.0f} ms wall, "
        f"{1e6 * wall / (b * m * h * w):.1f} ns per pixel and sample; op time summed "
        f"{total:.0f} ms"
    )
    for op, ms in totals.most_common(top):
        print(f"  {op:32s} {ms:8.1f} ms {100 * ms / total:5.1f} %")
    return {"shape": shape, "wall_ms": wall, "op_ms": dict(totals)}


# --- driver --------------------------------------------------------------------------------------
def _measure(args, side: str, shape, peer_dir):
    b, c, m, h, w = shape
    kwargs = dict(batch=b, classes=c, samples=m, height=h, width=w, rank=args.rank)
    kwargs["threads"] = args.threads
    python = None
    if side == "peer":
        kwargs["peer_dir"], python = peer_dir, args.peer_python
    factory = f"{side}_step"
    ms = _common.child_median_ms(
        __file__, factory, kwargs, args.repeats, args.warmup, python=python
    )
    mib = _common.peak_rss_increase_mib(__file__, factory, kwargs, python=python)
    return ms, mib


def _cell(ms, mib):
    return None if ms is None else f"{ms:.0f} ({mib:.0f})"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.profile:
        return {"profiles": [profile_ours(s, args.rank, args.threads) for s in args.shapes]}
    with tempfile.TemporaryDirectory(prefix="ssn_peer_") as work_dir:
        peer_dir, torch_version = None, None
        if not args.ours_only:
            try:
                peer_dir = extract_peer(args.peer_repo, os.path.join(work_dir, "peer"))
                torch_version = check_peer_python(args.peer_python)
            except PeerMissing as err:
                print(f"bench_vs_peer: {err}", file=sys.stderr)
                raise SystemExit(2) from None

        check = None if args.ours_only else value_check(args, peer_dir, work_dir)
        rows = []
        for shape in args.shapes:
            b, c, m, h, w = shape
            row = {"B": b, "C": c, "M": m, "size": f"{h}x{w}", "R": args.rank}
            sides = ["ours"] if args.ours_only else ["peer", "ours"]
            for side in sides:
                row[f"{side}_ms"], row[f"{side}_mib"] = _measure(args, side, shape, peer_dir)
            row["peer"] = _cell(row.get("peer_ms"), row.get("peer_mib"))
            row["ours"] = _cell(row["ours_ms"], row["ours_mib"])
            if not args.ours_only:
                row["time_ratio"] = row["ours_ms"] / row["peer_ms"]
                row["memory_ratio"] = row["ours_mib"] / row["peer_mib"] if row["peer_mib"] else None
            rows.append(row)
            print(f"  {shape}: peer {row['peer']}, tfp_seg {row['ours']} ms (MiB)", flush=True)
    columns = [
        ("B", "B", "d"),
        ("C", "C", "d"),
        ("M", "M", "d"),
        ("size", "H x W", ""),
        ("peer", "peer ms (MiB)", ""),
        ("ours", "tfp_seg ms (MiB)", ""),
        ("time_ratio", "time tfp_seg / peer", ".2f"),
        ("memory_ratio", "memory tfp_seg / peer", ".2f"),
    ]
    title = (
        f"SSN loss forward + backward to the head outputs, CPU, {args.threads} threads, "
        f"R={args.rank}, antithetic pairs; median of {args.repeats} calls, peak RSS increase "
        f"of one call; one fresh process per measurement"
    )
    return _common.publish(
        args,
        title,
        rows,
        columns,
        memory_source=_common.MEMORY_SOURCE,
        torch=torch_version,
        value_check=check,
    )


if __name__ == "__main__":
    main()
