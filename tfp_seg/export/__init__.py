"""Export: a SavedModel for TF Serving and an ONNX graph, both parity-checked.

Both exporters take a Keras model and a path. They read the model through an
`ExportAdapter`, the small contract an exporter needs from a probabilistic segmenter:

```none
state   = adapter.prepare(images)                 # the network, run once per request
params  = adapter.params(state)                   # {name: tensor}: packed params, loc, ...
mean    = adapter.mean_logits(state)              # [B, H, W, C], deterministic
samples = adapter.sample_logits(state, N, seed)   # [N, B, H, W, C], independent draws
averaged = adapter.sample_logits_for_mean(state, N, seed)   # for Monte Carlo means only
```

`as_adapter(model)` builds it for a model with a distribution head (a `tfp_seg.protocols.Head`;
`params = model(x)`, `model.head.sample_logits(params, N, seed=)`: `ProbabilisticSegmenter`
with any head), for the sampling baselines `tfp_seg.models.MCDropout` (dropout kept on in
the sampled signatures) and `tfp_seg.models.DeepEnsemble` (every member in one graph), or
or for a model that samples itself in graph-safe ops (`ProbabilisticUNet`, or a model of
your own). Such a model declares `tfp_seg.protocols.GraphSampler` - nothing else is probed:

```none
num_classes                                     C
sample_logits_tensor(images, num_samples, seed=None)
                                                [N, B, H, W, C] float, independent draws in
                                                graph-safe ops; N a Python int, seed None
                                                (stateful ops) or an int64 [2] tensor
mean_logits_tensor(images)                      [B, H, W, C], the deterministic logits
params_tensors(images) (optional, GraphParams)  {name: tensor}, extra `params` outputs
```

Anything else can be exported by passing `ExportAdapter.from_functions(...)` in place of the
model.

Samples handed to a client (`sample`, `uncertainty`, ONNX `logit_samples`) are independent
draws, as `model.sample` gives. Antithetic pairs (`mu +/- deviation`, the SSN head's default)
are used only where they reduce the variance of an average: the `probabilities` of
`serving_default`.

#### SavedModel signatures (`saved_model`)

```none
serving_default(images, num_samples?, seed?) -> probabilities [B,H,W,C] f32, labels [B,H,W] i32
sample(images, num_samples?, seed?)          -> labels [N,B,H,W] i32, logits [N,B,H,W,C] f32
uncertainty(images, num_samples?, seed?)     -> predictive_entropy, expected_entropy,
                                                mutual_information, variance  [B,H,W] f32
params(images)                               -> params [B,H,W,P] f32, mean_logits [B,H,W,C],
                                                (loc, cov_factor, cov_diag), head_config string;
                                                a mixture head: mixture_logits [B,K],
                                                component_loc / _cov_factor / _cov_diag [B,K,...]
images: float32 [B, H, W, channels]; num_samples: int32 scalar (default: export num_samples);
seed: int64 [2] for reproducible samples, or [] (the default) for fresh randomness.
```

Sampling uses the head's export-safe `sample_logits` with a stateless seed: the given one, or
one drawn with `tf.random.uniform` per request when none is given. Samples are drawn in chunks
of the export-time `num_samples` (chunk `i > 0` uses `stateless_fold_in(seed, i)`, `i` as int64:
`tfp_seg._seeds.fold_seed(seed, i, dtype=tf.int64)`), so a seeded
request with `num_samples` equal to the export value reproduces
`head.sample_logits(params, num_samples, seed=seed, antithetic=False)` exactly (`sample`,
`uncertainty`: independent draws), and `serving_default`'s probabilities are the mean softmax
of `head.sample_logits(params, num_samples, seed=seed)` with the head's own antithetic default
(SSN: mirrored pairs, a lower-variance mean; for an even `num_samples`).

#### Volumes

A model over volumes (`spatial_dims=3`: `UNet(spatial_dims=3)` with a head of
`spatial_dims=3`, `MCDropout` / `DeepEnsemble` over such models, `ProbabilisticUNet(...,
spatial_dims=3)`) exports through the same code: the spatial shape `S = (D, H, W)` replaces
`(H, W)` in every input and output above (`images [B, D, H, W, channels]`,
`probabilities [B, D, H, W, C]`, `logits [N, B, D, H, W, C]`, uncertainty maps and
`roi_mask` `[B, D, H, W]`). The rank is read from the model's input shape (or `image_shape`,
which must have the model's `spatial_dims` spatial axes); an exported graph rejects inputs of
another rank (the signature's / ONNX input's shape).

#### Region of interest (`roi_mask=True`)

For a head that takes a region of interest (`LowRankLogits`, `MixtureLowRankLogits`: outside
it the factor is zero and the diagonal epsilon), `saved_model(..., roi_mask=True)` and
`onnx(..., roi_mask=True)` give every signature (the ONNX graph) a second input after
`images`: `roi_mask` float32 `[B, H, W]`, 1 inside the region, 0 outside, passed with the
images to the model (`model({"images": images, "roi_mask": roi_mask})`):

```none
serving_default(images, roi_mask, num_samples?, seed?)   sample(images, roi_mask, ...)
uncertainty(images, roi_mask, num_samples?, seed?)       params(images, roi_mask)
```

A mask that is not `[B, H, W]` of the images fails the request (INVALID_ARGUMENT; in
onnxruntime a failed Reshape). It applies to a `ProbabilisticSegmenter` whose head takes a
region, and to an `MCDropout` or `DeepEnsemble` over such models (the mask goes to every
pass / member); for any other model (a `CategoricalLogits` or `HeteroscedasticLogits` head, a
`ProbabilisticUNet` or other `GraphSampler`, `ExportAdapter.from_functions`) the exporters
raise `ExportError` before writing anything (`ExportAdapter.check_roi_mask`; a model whose
output does not change with an all-zero mask is refused as ignoring it). The parity checks
then run on the check images with a check mask (default: a centred square). Without the
option the signatures take `images` alone, as above.

#### ONNX graph (`onnx`)

One graph, input `images`, dynamic batch, `num_samples` fixed at export; sampling with
`tf.random.uniform` (ONNX `RandomUniformLike`): outputs the `params` signature's tensors (no
string), `probabilities`, `labels`, `logit_samples [N,B,H,W,C]`, `label_samples [N,B,H,W]` and
the uncertainty maps. All sampled outputs of one run come from the same N independent draws
(`probabilities` is the mean softmax of that run's `logit_samples`). The head config is in the
model's `metadata_props["tfp_seg"]`.

Both exporters reload what they wrote and raise `ExportParityError` when the deterministic
outputs differ from the Keras model's by more than `atol`, before anything reaches `path`:
the SavedModel through `tf.saved_model.load` and through the TF1 session loader TF Serving
uses, the ONNX graph in onnxruntime (tf2onnx can log an error and still produce a graph).

#### Examples

```python
from tfp_seg import export

export.saved_model(model, "savedmodels/ssn/1", num_samples=16)   # ==> "savedmodels/ssn/1"
export.onnx(model, "ssn.onnx", num_samples=16)                    # ==> "ssn.onnx"
export.saved_model(model, "savedmodels/ssn_roi/1", roi_mask=True)  # ==> "savedmodels/ssn_roi/1"
loaded = tf.saved_model.load("savedmodels/ssn/1")
loaded.sample(images, num_samples=tf.constant(8), seed=tf.constant([1, 2], tf.int64))
# ==> {"labels": [8, B, H, W] int32, "logits": [8, B, H, W, C] float32}
```

#### Modules

```none
_common             ExportError, ExportParityError, SIGNATURES; argument checks, what is read
                    from a model, the exported image spec, the roi_mask input, the parity
                    comparison
adapters            ExportAdapter (the contract), HeadAdapter, FunctionAdapter
wrappers            MCDropoutAdapter, EnsembleAdapter (tfp_seg.uncertainty's samplers)
dispatch            as_adapter: which adapter a model gets
graphs              ServingModule (the four signatures), chunked sampling, uncertainty_maps
saved_model_export  saved_model (TF Serving layout, versions, parity checks)
onnx_export         onnx (tf2onnx conversion, onnxruntime parity checks)
```
"""

from tfp_seg.export._common import SIGNATURES, ExportError, ExportParityError
from tfp_seg.export.adapters import ExportAdapter
from tfp_seg.export.dispatch import as_adapter
from tfp_seg.export.graphs import ServingModule, uncertainty_maps
from tfp_seg.export.onnx_export import onnx
from tfp_seg.export.saved_model_export import saved_model

__all__ = [
    "ExportAdapter",
    "ExportError",
    "ExportParityError",
    "ServingModule",
    "SIGNATURES",
    "as_adapter",
    "onnx",
    "saved_model",
    "uncertainty_maps",
]
