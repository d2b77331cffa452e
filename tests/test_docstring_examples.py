"""The docstring examples that show results (`# ==> ...`) run, and their results hold.

The docstrings follow TensorFlow Probability's style: a fenced `python` block under
`#### Examples`, results written as comments, `expr  # ==> result` on the line or `# ==> result`
on the next one. This test finds every such block in tfp_seg (read from the source with `ast`,
so a new one is found without being listed), runs it statement by statement in a namespace that
the block's `SETUP` entry prepares (the objects an example only names: `images`, `model`,
`features`, ...), and compares each statement's value with its `# ==>` comment:

```none
a Python literal         0.25   (= 2 * 0.25 - 0.25 - 0)    equal; a float to its printed digits
a shape                  [8, B, H, W] label maps           the value's shape (or the value, if
                                                           it is a shape); B, H, W, C, N ...
                                                           are bound by SETUP or by their first
                                                           use, then must agree everywhere
a shape and dtype        [8, B, H, W] int32                shape, and dtype
"summing to 1"           [M_0] summing to 1                the values sum to 1 (1e-6)
an illustration          e.g. 0.23                         a finite scalar of that kind (the
                                                           value depends on the data)
arithmetic of sizes      [4*B, H, W, 4 * 16]               evaluated with the bound symbols
a dict                   {"labels": [...] int32, ...}      the same keys, each item as above
several, comma-separated (64, 32, 32, 1), (64, 4, 32, 32)  a tuple of values, item by item
```

Words after an item that are none of these are a remark (`prior-mean logits`). A block
without a `SETUP` entry fails, so a new example with results cannot go unchecked. Each
example runs in its own temporary folder (some write files: `savedmodels/ssn/1`).
"""

from __future__ import annotations

import ast
import io
import math
import pathlib
import re
import tokenize
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tfp_seg"
ARROW = "# ==>"
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


# ------------------------------------------------------------------------------------------------
# Finding the examples
# ------------------------------------------------------------------------------------------------


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _docstrings(tree: ast.Module, module: str):
    """(dotted name, docstring) of the module, and of its classes and functions, nested."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield module, doc
    todo: List[Tuple[str, ast.AST]] = [(module, node) for node in tree.body]
    while todo:
        prefix, node = todo.pop(0)
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield name, doc
            todo.extend((name, child) for child in node.body)


def find_examples() -> Dict[str, List[str]]:
    """`{dotted name: [code of each python block with a # ==> result]}` over tfp_seg."""
    found: Dict[str, List[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, doc in _docstrings(tree, _module_name(path)):
            blocks = [b for b in _BLOCK.findall(doc) if ARROW in b]
            if blocks:
                found[name] = blocks
    return found


EXAMPLES = find_examples()


# ------------------------------------------------------------------------------------------------
# The expected results
# ------------------------------------------------------------------------------------------------

_DTYPES = ("int32", "int64", "float16", "float32", "float64", "bool", "uint8")


def _split_top(text: str, sep: str = ",") -> List[str]:
    """Split at `sep` outside brackets and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _closing(text: str) -> int:
    """Index just past the bracket group or string literal that `text` starts with."""
    if text[0] in "\"'":
        return text.index(text[0], 1) + 1
    pairs = {"(": ")", "[": "]", "{": "}"}
    depth = 0
    for i, ch in enumerate(text):
        if ch in pairs:
            depth += 1
        elif ch in pairs.values():
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced brackets in expected result {text!r}")


def parse_item(text: str) -> Dict[str, Any]:
    """One expected item: `{"kind": "literal" | "shape" | "dict", ..., "dtype", "sums_to_1"}`."""
    text = text.strip()
    number = re.match(r"-?\d+(\.\d*)?(e-?\d+)?", text)
    if text[0] == "{":
        end = _closing(text)
        entries = {}
        for entry in _split_top(text[1 : end - 1]):
            key, _, value = entry.partition(":")
            entries[ast.literal_eval(key.strip())] = parse_item(value)
        item: Dict[str, Any] = {"kind": "dict", "entries": entries}
    elif text[0] == "[":
        end = _closing(text)
        dims = [d.strip() for d in _split_top(text[1 : end - 1])]
        item = {"kind": "shape", "dims": [int(d) if d.isdigit() else d for d in dims]}
    elif text.startswith("e.g."):  # an illustration: a value of that kind, not that value
        rest = text[4:].strip()
        example = re.match(r"-?\d+(\.\d*)?", rest)
        if example is None:
            raise ValueError(f"`e.g.` must be followed by a number: {text!r}")
        end = 4 + (len(text[4:]) - len(rest)) + example.end()
        item = {"kind": "example", "value": ast.literal_eval(example.group(0))}
    elif text[0] in "(\"'":
        end = _closing(text)
        item = {"kind": "literal", "value": ast.literal_eval(text[:end])}
    elif number:
        end = number.end()
        digits = number.group(0)
        item = {"kind": "literal", "value": ast.literal_eval(digits)}
        # a float is right to its printed digits: 0.25 stands for [0.245, 0.255]
        decimals = len(digits.split(".")[1].split("e")[0]) if "." in digits else None
        item["tolerance"] = 0.0 if decimals is None else 0.5 * 10.0**-decimals
    else:
        raise ValueError(f"cannot read the expected result {text!r}")
    remark = text[end:]
    item["dtype"] = next((d for d in _DTYPES if re.search(rf"\b{d}\b", remark)), None)
    item["sums_to_1"] = "summing to 1" in remark
    return item


def parse_expected(text: str) -> List[Dict[str, Any]]:
    """The items of one `# ==>` comment; a part with no value (only words) is a remark."""
    items = []
    for part in _split_top(text):
        # a number is a value when it stands alone or before a parenthesised remark;
        # `2 per member` is a remark
        number = re.fullmatch(r"-?\d[\d.e-]*(\s+\(.*\))?", part)
        if part and (part[0] in "[({\"'" or number or part.startswith("e.g. ")):
            items.append(parse_item(part))
        elif not items:
            raise ValueError(f"the expected result {text!r} starts with no value")
    return items


def _shape_of(value) -> Tuple:
    if hasattr(value, "shape") and not isinstance(value, tuple):
        return tuple(value.shape)
    if hasattr(value, "as_list"):  # tf.TensorShape
        return tuple(value.as_list())
    return tuple(value)


def check_item(value, item: Dict[str, Any], dims: Dict[str, int], where: str) -> None:
    """Assert that `value` is what `item` says (binding new dimension symbols in `dims`)."""
    if item["kind"] == "dict":
        assert set(value) == set(item["entries"]), f"{where}: keys {sorted(value)}"
        for key, sub in item["entries"].items():
            check_item(value[key], sub, dims, f"{where}[{key!r}]")
        return
    if item["kind"] == "literal":
        expected = item["value"]
        if isinstance(expected, (int, float)) and not isinstance(expected, bool):
            got = float(np.asarray(value))
            assert math.isclose(got, expected, rel_tol=0, abs_tol=item["tolerance"] + 1e-12), (
                f"{where}: {got} != {expected}"
            )
        elif isinstance(expected, str):
            assert str(value) == expected, f"{where}: {value!r} != {expected!r}"
        else:  # a tuple or list: a shape (of the value, or the value itself) or values
            got = _shape_of(value) if _shape_like(value) else value
            assert tuple(got) == tuple(expected), f"{where}: {got} != {expected}"
    elif item["kind"] == "example":
        got = np.asarray(value)
        kind = np.floating if isinstance(item["value"], float) else np.integer
        assert got.shape == () and np.issubdtype(got.dtype, kind), (
            f"{where}: {value!r} is not a scalar like {item['value']!r}"
        )
        assert np.isfinite(got), f"{where}: {value!r} is not finite"
    else:
        shape = _shape_of(value)
        assert len(shape) == len(item["dims"]), f"{where}: shape {shape}, want {item['dims']}"
        for axis, (size, dim) in enumerate(zip(shape, item["dims"], strict=True)):
            if isinstance(dim, str) and dim.isidentifier():
                dims.setdefault(dim, size)
                dim = dims[dim]
            elif isinstance(dim, str):  # arithmetic of bound symbols: `4 * B`, `4 * 16`
                dim = eval(compile(dim, "<dim>", "eval"), {"__builtins__": {}}, dict(dims))
            assert size == dim, f"{where}: axis {axis} has size {size}, want {dim} ({item})"
    if item["dtype"]:
        assert np.dtype(getattr(value.dtype, "as_numpy_dtype", value.dtype)) == item["dtype"], (
            f"{where}: dtype {value.dtype}, want {item['dtype']}"
        )
    if item["sums_to_1"]:
        assert abs(float(np.sum(np.asarray(value))) - 1.0) < 1e-6, f"{where}: does not sum to 1"


def _shape_like(value) -> bool:
    """An array or tensor (compare its shape), or a shape itself (TensorShape, int tuple)."""
    if hasattr(value, "as_list") or (hasattr(value, "shape") and not isinstance(value, tuple)):
        return True
    return isinstance(value, tuple) and all(isinstance(v, (int, type(None))) for v in value)


# ------------------------------------------------------------------------------------------------
# Running a block
# ------------------------------------------------------------------------------------------------


def _results(code: str) -> Dict[int, str]:
    """`{line: expected}`: each `# ==>` comment, at the line of the statement it describes."""
    out = {}
    lines = code.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith(ARROW):
            row = tok.start[0]
            alone = not lines[row - 1][: tok.start[1]].strip()
            out[(row - 1) if alone else row] = tok.string[len(ARROW) :].strip()
    return out


def run_block(code: str, namespace: Dict[str, Any], dims: Dict[str, int]) -> int:
    """Run `code` statement by statement; check each `# ==>` result. Returns the number checked."""
    tree = ast.parse(code)
    results = _results(code)
    checked = 0
    for statement in tree.body:
        expected = next(
            (text for line, text in results.items() if line == statement.end_lineno), None
        )
        source = ast.get_source_segment(code, statement)
        if expected is None:
            exec(compile(source, "<example>", "exec"), namespace)
            continue
        if isinstance(statement, ast.Expr):
            value = eval(compile(source, "<example>", "eval"), namespace)
        elif isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            exec(compile(source, "<example>", "exec"), namespace)
            target = statement.targets[0]
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            values = [eval(compile(ast.unparse(n), "<example>", "eval"), namespace) for n in names]
            value = tuple(values) if isinstance(target, ast.Tuple) else values[0]
        else:
            raise AssertionError(f"a `# ==>` result must follow an expression: {source!r}")
        items = parse_expected(expected)
        if len(items) == 1:
            check_item(value, items[0], dims, source)
        else:
            assert isinstance(value, (tuple, list)) and len(value) == len(items), (
                f"{source}: {len(items)} results expected, got {type(value).__name__}"
            )
            for v, item in zip(value, items, strict=True):
                check_item(v, item, dims, source)
        checked += 1
    return checked


# ------------------------------------------------------------------------------------------------
# What each example names but does not define
# ------------------------------------------------------------------------------------------------


def _base() -> Dict[str, Any]:
    import keras
    import tensorflow as tf

    import tfp_seg

    return {"tfp_seg": tfp_seg, "np": np, "tf": tf, "keras": keras}


def _shapes_data(num_images: int = 4):
    import tfp_seg

    return tfp_seg.data.ambiguous_shapes(num_images=num_images, image_size=16, seed=0)


def _setup_module_globals(module: str, **extra: Any):
    """A block run as in its module (its globals, as doctest does), plus the usual imports."""

    def setup():
        import importlib

        ns = {**vars(importlib.import_module(module)), **_base()}
        ns.update({name: importlib.import_module(lib) for name, lib in extra.items()})
        return ns, {}

    return setup


def _setup_segmenter():
    data = _shapes_data()
    ns = {**_base(), "images": data.images, "labels": data.annotations[:, 0]}
    return ns, {"B": 4, "H": 16, "W": 16}


def _setup_prob_unet():
    data = _shapes_data()
    ds = data.to_dataset(batch_size=4, annotation="first", shuffle=False)
    return {**_base(), "images": data.images, "dataset": ds}, {"B": 4, "H": 16, "W": 16}


def _small_ssn_model():
    import tfp_seg

    model = tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=4, depth=1), tfp_seg.layers.LowRankLogits(3, rank=2)
    )
    model.build((None, 16, 16, 1))
    return model


def _setup_export():
    from tfp_seg import export as export_module

    data = _shapes_data(num_images=2)
    ns = {**_base(), "export": export_module, "model": _small_ssn_model(), "images": data.images}
    return ns, {"B": 2, "H": 16, "W": 16, "C": 3}


def _setup_mc_dropout():
    import tfp_seg

    model = tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=4, depth=1, dropout=0.1),
        tfp_seg.layers.CategoricalLogits(3),
    )
    data = _shapes_data(num_images=2)
    return {**_base(), "model": model, "images": data.images}, {"B": 2, "H": 16, "W": 16, "C": 3}


def _setup_deep_ensemble():
    data = _shapes_data()
    ns = {**_base(), "images": data.images, "labels": data.annotations[:, 0]}
    return ns, {"B": 4, "H": 16, "W": 16, "C": 3}


def _setup_images():
    data = _shapes_data(num_images=2)
    return {**_base(), "images": data.images}, {"B": 2, "H": 16, "W": 16}


def _setup_conformal():
    data = _shapes_data(num_images=6)
    ns = {
        **_base(),
        "model": _small_ssn_model(),
        "val_images": data.images[:4],
        "val_labels": data.annotations[:4, 0],
        "test_images": data.images[4:],
    }
    return ns, {}


def _setup_temperature():
    # logits of an over-confident classifier: right 80% of the time, at confidence ~0.98
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=600)
    guess = np.where(rng.random(600) < 0.8, labels, rng.integers(0, 3, size=600))
    logits = 4.0 * np.eye(3)[guess] + rng.normal(0.0, 0.3, size=(600, 3))
    ns = {**_base(), "val_logits": logits[:400], "val_labels": labels[:400]}
    ns["test_logits"] = logits[400:]
    return ns, {}


def _setup_controlled():
    val, test = _shapes_data(num_images=4), _shapes_data(num_images=2)
    ns = {
        **_base(),
        "model": _small_ssn_model(),
        "val": val,
        "val_images": val.images,
        "val_raters": val.annotations,
        "test_images": test.images,
        "test_data": test,
    }
    return ns, {"B": 2, "H": 16, "W": 16}


SETUP: Dict[str, Callable[[], Tuple[Dict[str, Any], Dict[str, int]]]] = {
    "tfp_seg.calibration.conformal.ConformalRiskControl": _setup_conformal,
    "tfp_seg.calibration.temperature.TemperatureScaling": _setup_temperature,
    "tfp_seg.calibration.controlled.ControlledSampler": _setup_controlled,
    "tfp_seg.calibration.controlled.CovarianceTemperature": _setup_controlled,
    "tfp_seg.data.ambiguous_shapes.ambiguous_shapes": lambda: (_base(), {}),
    "tfp_seg.export": _setup_export,
    "tfp_seg.layers.batch_ensemble.BatchEnsembleConv": _setup_images,
    "tfp_seg.layers.categorical_logits.CategoricalLogits": lambda: (_base(), {}),
    "tfp_seg.layers.packed.PackedConv": _setup_images,
    "tfp_seg.metrics.sets.generalized_energy_distance": _setup_module_globals(
        "tfp_seg.metrics.sets"
    ),
    "tfp_seg.models.backbones.adapter.BackboneAdapter": _setup_module_globals(
        "tfp_seg.models.backbones.adapter", keras_hub="keras_hub"
    ),
    "tfp_seg.models.ensembles.EnsembleSegmenter": _setup_deep_ensemble,
    "tfp_seg.models.backbones.keras_hub.from_keras_hub": _setup_module_globals(
        "tfp_seg", keras_hub="keras_hub"
    ),
    "tfp_seg.models.hierarchical_prob_unet.HierarchicalProbabilisticUNet": _setup_prob_unet,
    "tfp_seg.models.prob_unet.ProbabilisticUNet": _setup_prob_unet,
    "tfp_seg.models.segmenter.ProbabilisticSegmenter": _setup_segmenter,
    "tfp_seg.models.wrappers.MCDropout": _setup_mc_dropout,
    "tfp_seg.models.wrappers.DeepEnsemble": _setup_deep_ensemble,
}
# Examples that train several models (over ~20 s on 2 cores).
SLOW = {"tfp_seg.models.wrappers.DeepEnsemble"}


def _params():
    for name, blocks in sorted(EXAMPLES.items()):
        marks = [pytest.mark.slow] if name in SLOW else []
        for k in range(len(blocks)):
            yield pytest.param(name, k, id=f"{name}[{k}]", marks=marks)


def test_examples_are_found():
    # The repository's docstrings show results in these places at least (a parser that finds
    # none would make every other test here vacuous).
    assert {"tfp_seg.metrics.sets.generalized_energy_distance", "tfp_seg.export"} <= set(EXAMPLES)
    assert sum(len(b) for b in EXAMPLES.values()) >= 10


def test_every_example_has_a_setup():
    assert set(EXAMPLES) <= set(SETUP), sorted(set(EXAMPLES) - set(SETUP))


@pytest.mark.parametrize("name, index", list(_params()))
def test_docstring_example(name, index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import keras

    keras.utils.set_random_seed(0)
    namespace, dims = SETUP[name]()
    checked = run_block(EXAMPLES[name][index], namespace, dict(dims))
    assert checked == len(_results(EXAMPLES[name][index])) >= 1


# ------------------------------------------------------------------------------------------------
# The checker itself
# ------------------------------------------------------------------------------------------------


def test_the_checker_rejects_wrong_results():
    ns = {"np": np}
    with pytest.raises(AssertionError, match="axis 0"):
        run_block("np.zeros([2, 3])  # ==> [3, 3]\n", dict(ns), {})
    with pytest.raises(AssertionError, match="want 2"):
        run_block("np.zeros([2, 3])  # ==> [B, 3]\nnp.zeros([3])  # ==> [B]\n", dict(ns), {})
    with pytest.raises(AssertionError, match="dtype"):
        run_block("np.zeros([2], np.int64)  # ==> [2] int32\n", dict(ns), {})
    with pytest.raises(AssertionError, match="sum to 1"):
        run_block("np.full([2], 0.4)  # ==> [2] summing to 1\n", dict(ns), {})
    with pytest.raises(AssertionError, match="0.26 != 0.25"):
        run_block("0.26\n# ==> 0.25   (a remark)\n", dict(ns), {})
    with pytest.raises(AssertionError, match="not a scalar"):
        run_block("np.zeros([2])  # ==> e.g. 0.23\n", dict(ns), {})
    with pytest.raises(AssertionError, match="want 8"):
        run_block("np.zeros([4])  # ==> [N]\nnp.zeros([6])  # ==> [2 * N]\n", dict(ns), {})
    with pytest.raises(AssertionError, match="keys"):
        run_block('{"a": np.zeros(2)}  # ==> {"b": [2]}\n', dict(ns), {})


def test_the_checker_accepts_right_results():
    ns = {"np": np}
    code = (
        "x = np.full([4], 0.25)  # ==> [N] summing to 1\n"
        "x.shape, (1, 2)  # ==> (4,), (1, 2)\n"
        "0.2504\n# ==> 0.25   (printed to 2 digits)\n"
        '{"a": np.zeros([4, 2], np.int32)}  # ==> {"a": [N, 2] int32}\n'
        '"out/1"  # ==> "out/1"\n'
        "np.zeros([4, 3])  # ==> [N, 3], a remark, 2 per member\n"
        "np.zeros([8, 3])  # ==> [2 * N, 3]\n"
        "float(np.pi)  # ==> e.g. 3.0 (depends on the data)\n"
    )
    assert run_block(code, ns, {}) == 8
