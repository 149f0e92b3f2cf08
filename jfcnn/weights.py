"""torchvision weights -> jfcnn variables, with strict key and shape checks.

Reads a torchvision ``state_dict`` from ``.pth`` (needs torch, imported only
then), ``.safetensors`` or ``.npz`` (NumPy only, so a user converts without
torch), and maps it onto the variables of :class:`jfcnn.models.resnet.ResNet`
(an ImageNet classifier's ``conv1 .. layer4``) or of
:class:`jfcnn.models.maskrcnn.MaskRCNN` (``maskrcnn_resnet50_fpn``'s whole
state dict, in the published v1 key names or current torchvision's).

The mapping is built from the jfcnn model's own variable tree: every leaf the
model has names the torchvision key it comes from, so a missing key, an
extra key or a wrong shape stops the conversion with a :class:`WeightsError`
that names the first bad key and what was expected. Layouts:

  convolution ``(O, I, KH, KW)`` -> ``(KH, KW, I, O)``;
  transposed convolution ``(I, O, KH, KW)`` -> ``(KH, KW, I, O)``;
  linear ``(O, I)`` -> ``(I, O)``, and the box head's first layer also
  reorders its inputs from torch's ``(C, H, W)`` flattening to flax's
  ``(H, W, C)``;
  batch norm ``weight``, ``bias``, ``running_mean``, ``running_var`` ->
  ``scale``, ``bias``, ``mean``, ``var``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jfcnn.errors import MissingDependencyError, UserError

FORMATS = (".pth", ".pt", ".safetensors", ".npz")
# Keys that carry no weights (BatchNorm's counter) or belong to no jfcnn layer
# (the ImageNet classifier).
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$|^fc\.(weight|bias)$")
_NORM_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# torchvision stage names of jfcnn's backbone stages.
_STAGES = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}


class WeightsError(UserError, ValueError):
    """A weights file that does not fit the model (missing, extra or misshapen keys)."""


# ---------------------------------------------------------------------------
# Reading and writing files


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The arrays of a ``state_dict`` file, by key, as float32/int NumPy arrays.

    ``.pth``/``.pt``: ``torch.save(model.state_dict())`` (or a checkpoint
    dict holding one under ``"model"`` or ``"state_dict"``), read with
    ``torch.load(weights_only=True)``; needs torch. ``.safetensors`` and
    ``.npz``: the same keys, read with NumPy alone.

    Raises:
      FileNotFoundError: no file at ``path``.
      MissingDependencyError: a ``.pth`` file and no torch.
      WeightsError: an unknown extension or an unreadable file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No weights file at {path}.")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pth", ".pt"):
        return _read_torch(path)
    if ext == ".safetensors":
        return read_safetensors(path)
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    raise WeightsError(f"{path}: unknown weights format {ext!r}; use one of {list(FORMATS)}.")


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        if sys.modules.get("torch", False) is None or importlib.util.find_spec("torch") is None:
            raise ImportError("torch")
    except (ImportError, ValueError) as e:
        raise MissingDependencyError(
            f"Reading {path} needs torch: run `pip install 'jfcnn[torch]'`, or convert the file "
            "to .safetensors or .npz (same keys) where torch is installed."
        ) from e
    if "tensorflow" in sys.modules and "torch" not in sys.modules:
        # Some torch builds crash when imported after TensorFlow (as in a
        # training run, whose input pipeline is loaded first): read the file
        # in a fresh interpreter instead.
        return _read_torch_in_subprocess(path)
    return _torch_state_dict(path)


def _torch_state_dict(path: str) -> dict[str, np.ndarray]:
    import torch

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a state_dict.")
    return {key: value.detach().cpu().numpy() for key, value in loaded.items()}


def _read_torch_in_subprocess(path: str) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "weights.npz")
        code = (
            "import sys, numpy as np\n"
            "from jfcnn.weights import _torch_state_dict\n"
            "np.savez(sys.argv[2], **_torch_state_dict(sys.argv[1]))\n"
        )
        # The interpreter must find this jfcnn even when it is not installed.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        result = subprocess.run(
            [sys.executable, "-c", code, path, out], capture_output=True, text=True, env=env
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise WeightsError(f"Could not read {path} with torch: {last}")
        with np.load(out, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}


# safetensors dtype names <-> NumPy dtypes (the ones state dicts use).
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file with NumPy (no ``safetensors`` package needed).

    The format: an 8-byte little-endian header length, a JSON header mapping
    each key to ``dtype``, ``shape`` and ``data_offsets`` into the byte
    buffer that follows.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        (length,) = np.frombuffer(data[:8], "<u8")
        header = json.loads(data[8 : 8 + int(length)])
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not a safetensors file ({e}).") from e
    buffer = memoryview(data)[8 + int(length) :]
    arrays = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: key {key!r} has unsupported dtype {info['dtype']}.")
        start, stop = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        arrays[key] = np.frombuffer(buffer[start:stop], dtype).reshape(info["shape"]).copy()
    return arrays


def write_safetensors(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes ``arrays`` as a ``.safetensors`` file (readable by the safetensors package)."""
    names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header[key] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # The format pads the header to 8 bytes.
    with open(path, "wb") as f:
        f.write(np.uint64(len(encoded)).astype("<u8").tobytes())
        f.write(encoded)
        for chunk in chunks:
            f.write(chunk)


# ---------------------------------------------------------------------------
# Layout transforms: (jfcnn from torch, torch shape from jfcnn shape)


def _conv(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (2, 3, 1, 0))


def _conv_transpose(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (2, 3, 0, 1))


def _linear(x: np.ndarray) -> np.ndarray:
    return np.transpose(x)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


_TORCH_SHAPE: dict[Callable, Callable[[tuple], tuple]] = {
    _conv: lambda s: (s[3], s[2], s[0], s[1]),
    _conv_transpose: lambda s: (s[2], s[3], s[0], s[1]),
    _linear: lambda s: (s[1], s[0]),
    _identity: lambda s: tuple(s),
}


def _flattened_chw_linear(pool: int) -> Callable[[np.ndarray], np.ndarray]:
    """fc6 of the box head: torch flattens ROI features ``(C, H, W)``, flax ``(H, W, C)``."""

    def transform(x: np.ndarray) -> np.ndarray:
        out = x.shape[0]
        channels = x.shape[1] // (pool * pool)
        x = x.reshape(out, channels, pool, pool)
        return np.transpose(x, (2, 3, 1, 0)).reshape(pool * pool * channels, out)

    _TORCH_SHAPE[transform] = lambda s: (s[1], s[0])
    return transform


# ---------------------------------------------------------------------------
# Key tables: jfcnn variable path -> (torchvision key, transform)

Table = dict[tuple[str, ...], tuple[str, Callable[[np.ndarray], np.ndarray]]]


def _resnet_key(path: tuple[str, ...]) -> tuple[str, Callable]:
    """The torchvision ResNet key of a ResNet variable path (without the collection)."""
    *modules, leaf = path
    if modules[0] in ("stem_conv", "stem_norm"):
        torch_module = "conv1" if modules[0] == "stem_conv" else "bn1"
    else:
        stage, block, layer = modules
        layer = {"shortcut_conv": "downsample.0", "shortcut_norm": "downsample.1"}.get(
            layer, layer.replace("norm", "bn")
        )
        torch_module = f"{_STAGES[stage]}.{block.removeprefix('block')}.{layer}"
    if leaf == "kernel":
        return f"{torch_module}.weight", _conv
    return f"{torch_module}.{_NORM_LEAVES[leaf]}", _identity


def _leaves(variables: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``(collection, *path) -> shape`` of every leaf of a variables tree."""
    out: dict[tuple[str, ...], tuple[int, ...]] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, (*path, str(key)))
        else:
            out[path] = tuple(node.shape)

    walk(variables, ())
    return out


def resnet_table(variables: Mapping[str, Any], prefix: str = "") -> Table:
    """The key table of :class:`~jfcnn.models.resnet.ResNet` variables (or their shapes)."""
    return {
        path: ((prefix + key), transform)
        for path in _leaves(variables)
        for key, transform in [_resnet_key(path[1:])]
    }


def maskrcnn_table(
    variables: Mapping[str, Any], fpn_in_features: tuple[str, ...], box_pool_size: int = 7
) -> Table:
    """The key table of a ``roi_heads="fpn"`` :class:`MaskRCNN`, in current torchvision names.

    Published v1 files use older names; :func:`current_key_names` maps them.
    """
    table: Table = {}
    for path in _leaves(variables):
        top, *rest = path[1:]
        module, leaf = "/".join(rest[:-1]), rest[-1]
        suffix = "weight" if leaf == "kernel" else leaf
        if top == "backbone":
            key, transform = _resnet_key(tuple(rest))
            table[path] = ("backbone.body." + key, transform)
            continue
        if top == "fpn":
            kind, level = module.split("_p")
            index = fpn_in_features.index(f"res{level}")
            block = "inner_blocks" if kind == "lateral" else "layer_blocks"
            key = f"backbone.fpn.{block}.{index}.0.{suffix}"
        elif top == "rpn":
            torch_module = {"conv": "conv.0.0", "cls": "cls_logits", "bbox": "bbox_pred"}[module]
            key = f"rpn.head.{torch_module}.{suffix}"
        elif top == "box_branch":
            torch_module = {
                "fc6": "box_head.fc6",
                "fc7": "box_head.fc7",
                "predictor/cls_score": "box_predictor.cls_score",
                "predictor/bbox_pred": "box_predictor.bbox_pred",
            }[module]
            key = f"roi_heads.{torch_module}.{suffix}"
            if leaf == "kernel":
                table[path] = (
                    key,
                    _flattened_chw_linear(box_pool_size) if module == "fc6" else _linear,
                )
                continue
        elif top == "mask_branch":
            if module.startswith("conv"):
                torch_module = f"mask_head.{int(module.removeprefix('conv')) - 1}.0"
            else:
                torch_module = {
                    "deconv": "mask_predictor.conv5_mask",
                    "predictor": "mask_predictor.mask_fcn_logits",
                }[module]
            key = f"roi_heads.{torch_module}.{suffix}"
            if leaf == "kernel" and module == "deconv":
                table[path] = (key, _conv_transpose)
                continue
        else:
            raise WeightsError(f"No torchvision counterpart for the jfcnn layer {'/'.join(path)}.")
        table[path] = (key, _conv if leaf == "kernel" else _identity)
    return table


# Published v1 names (torchvision < 0.13 modules) -> current names.
_V1_RENAMES = (
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"), None),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (
        re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$"),
        r"backbone.fpn.\1.\2.0.\3",
    ),
)


def current_key_names(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """``(state_dict in current torchvision key names, whether any key was v1)``.

    The published ``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth`` names the mask
    head ``mask_head.mask_fcn1``, the RPN conv ``rpn.head.conv`` and the FPN
    convs ``inner_blocks.0``; torchvision >= 0.13 wraps each in a
    ``Conv2dNormActivation`` (``mask_head.0.0``, ``conv.0.0``,
    ``inner_blocks.0.0``) and renames them when it loads the file.
    """
    renamed: dict[str, Any] = {}
    was_v1 = False
    for key, value in state_dict.items():
        new = key
        for pattern, replacement in _V1_RENAMES:
            match = pattern.match(key)
            if match is None:
                continue
            if replacement is None:  # mask_fcn{i} -> {i - 1}.0
                new = f"roi_heads.mask_head.{int(match[1]) - 1}.0.{match[2]}"
            else:
                new = pattern.sub(replacement, key)
            was_v1 = True
            break
        renamed[new] = value
    return renamed, was_v1


# ---------------------------------------------------------------------------
# Applying a table


def _resnet_depth(keys: list[str], prefix: str) -> str:
    """What ResNet the keys hold, for error messages (e.g. ``"ResNet-50"``)."""
    blocks = []
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        found = {
            int(m[1])
            for k in keys
            for m in [re.match(rf"{re.escape(prefix)}{stage}\.(\d+)\.", k)]
            if m
        }
        blocks.append(max(found) + 1 if found else 0)
    bottleneck = any(k.startswith(prefix) and ".conv3." in k for k in keys)
    specs = {
        (False, (2, 2, 2, 2)): 18,
        (False, (3, 4, 6, 3)): 34,
        (True, (3, 4, 6, 3)): 50,
        (True, (3, 4, 23, 3)): 101,
    }
    depth = specs.get((bottleneck, tuple(blocks)))
    kind = "bottleneck" if bottleneck else "basic"
    return f"ResNet-{depth}" if depth else f"a ResNet of {kind} blocks {tuple(blocks)}"


def apply_table(
    table: Table,
    state_dict: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    source: str,
    ignore: Callable[[str], bool] = lambda key: bool(_IGNORED.search(key)),
    describe: Callable[[list[str]], str] | None = None,
) -> dict[str, Any]:
    """Fills the tree of ``expected`` (arrays or shapes) with ``state_dict``'s values.

    Args:
      table: jfcnn path ``(collection, ...)`` -> (torchvision key, transform).
      state_dict: torchvision key -> array.
      expected: the model's variables (or ``jax.eval_shape`` of them).
      source: what ``state_dict`` came from, for messages (e.g. the file).
      ignore: keys that map to nothing and are not an error.
      describe: says what the file holds (e.g. its ResNet depth), for messages.

    Raises:
      WeightsError: naming the first missing key, the first key of the wrong
        shape (with the shape expected) or the first key the model has no
        place for.
    """
    keys = list(state_dict)
    hint = f" ({source} holds {describe(keys)})" if describe else ""
    shapes = _leaves(expected)
    by_key = {key: (path, transform) for path, (key, transform) in table.items()}
    # Misshapen keys first, in the file's order: after a wrong depth, the first
    # differing layer says more than the first key the file lacks.
    for key in keys:
        if key in by_key:
            path, transform = by_key[key]
            want = _TORCH_SHAPE[transform](shapes[path])
            if tuple(np.shape(state_dict[key])) != want:
                raise WeightsError(
                    f"{source}: key {key!r} has shape {tuple(np.shape(state_dict[key]))}, "
                    f"expected {want} (jfcnn's {'/'.join(path)}){hint}."
                )
    for path, (key, transform) in table.items():
        if key not in state_dict:
            want = _TORCH_SHAPE[transform](shapes[path])
            raise WeightsError(
                f"{source} has no key {key!r} (expected shape {want} for jfcnn's "
                f"{'/'.join(path)}){hint}."
            )
    extra = [k for k in keys if k not in by_key and not ignore(k)]
    if extra:
        raise WeightsError(
            f"{source}: key {extra[0]!r} has no place in the model ({len(extra)} such keys){hint}."
        )
    out: dict[str, Any] = {}
    for path, (key, transform) in table.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = transform(np.asarray(state_dict[key], np.float32))
    return out


def resnet_variables(
    state_dict: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    source: str = "the state dict",
    prefix: str = "",
) -> dict[str, Any]:
    """torchvision ResNet ``state_dict`` -> variables shaped like ``expected``.

    Args:
      state_dict: ``torchvision.models.resnet{18,34,50,101}().state_dict()``
        (the classifier ``fc.*`` is ignored), keys under ``prefix``.
      expected: the :class:`~jfcnn.models.resnet.ResNet`'s variables (or
        shapes): which collection each norm vector goes to follows the
        model's norm (all in ``batch_stats`` for frozen batch norm).
      source: the file, for messages.
      prefix: of the ResNet keys, e.g. ``"backbone.body."``; other keys are
        an error, except those of stages ``expected`` lacks (a backbone that
        stops at res4).
    """
    table = resnet_table(expected, prefix)
    # A backbone that stops early (an FPN on res2-res4) has no place for the
    # later stages; their keys are skipped, not an error.
    unbuilt = tuple(
        f"{prefix}{layer}." for stage, layer in _STAGES.items() if stage not in expected["params"]
    )

    def ignore(key: str) -> bool:
        return bool(_IGNORED.search(key.removeprefix(prefix))) or key.startswith(unbuilt or ("\0",))

    return apply_table(
        table,
        state_dict,
        expected,
        source=source,
        ignore=ignore,
        describe=lambda keys: _resnet_depth(keys, prefix),
    )


def _detector_contents(keys: list[str]) -> str:
    if not any(key.startswith("backbone.body.") for key in keys):
        return (
            f"no detector keys but {_resnet_depth(keys, '')}: an ImageNet classifier, which "
            "is model.backbone_weights of a training run"
        )
    return _resnet_depth(keys, "backbone.body.") + " backbone"


def maskrcnn_variables(
    state_dict: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    fpn_in_features: tuple[str, ...] = ("res2", "res3", "res4", "res5"),
    box_pool_size: int = 7,
    source: str = "the state dict",
) -> dict[str, Any]:
    """``maskrcnn_resnet50_fpn`` ``state_dict`` (v1 or current names) -> MaskRCNN variables."""
    current, _ = current_key_names(state_dict)
    table = maskrcnn_table(expected, tuple(fpn_in_features), box_pool_size)
    return apply_table(
        table,
        current,
        expected,
        source=source,
        describe=lambda keys: _detector_contents(keys),
    )
