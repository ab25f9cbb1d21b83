"""Random-weight ONNX files with the signatures of NudeNet v2's classifier and detector, built offline with
the ``onnx`` package, so the judges that load the user's v2 files can be tested without them. Their
verdicts are noise; the inputs they read (layout, size, value range) are the real models'.

* classifier: input (N, 256, 256, 3) float32 → softmax over (unsafe, safe), a random linear map of every
  input value (so any change to the preprocessing changes the scores);
* detector: input (1, H, W, 3) float32 → boxes (1, K, 4) float32, scores (1, K) float32, labels (1, K)
  int32; scores are a sigmoid of the channel means and the input height (so resizing matters), labels
  cycle through the classes; its class file (v2's default classes) is written beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

V2_DEFAULT_CLASSES = (
    "EXPOSED_ANUS",
    "EXPOSED_ARMPITS",
    "COVERED_BELLY",
    "EXPOSED_BELLY",
    "COVERED_BUTTOCKS",
    "EXPOSED_BUTTOCKS",
    "FACE_F",
    "FACE_M",
    "COVERED_FEET",
    "EXPOSED_FEET",
    "COVERED_BREAST_F",
    "EXPOSED_BREAST_F",
    "COVERED_GENITALIA_F",
    "EXPOSED_GENITALIA_F",
    "EXPOSED_BREAST_M",
    "EXPOSED_GENITALIA_M",
)


def _save(graph, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="safe-diffusion tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_nudenet_v2_classifier(path, seed: int = 0) -> Path:
    """A random classifier with v2's signature; returns `path`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    size = 256 * 256 * 3
    weight = (rng.standard_normal((size, 2)) * 0.004).astype(np.float32)
    bias = np.array([0.0, 0.1], dtype=np.float32)
    nodes = [
        helper.make_node("Reshape", ["input_1", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weight"], ["logits0"]),
        helper.make_node("Add", ["logits0", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["dense_3"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "nudenet_v2_classifier_double",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", 256, 256, 3])],
        [helper.make_tensor_value_info("dense_3", TensorProto.FLOAT, ["N", 2])],
        [
            numpy_helper.from_array(np.array([-1, size], dtype=np.int64), "shape"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    return _save(graph, path)


def build_nudenet_v2_detector(path, seed: int = 0, detections: int = 12) -> Path:
    """A random detector with v2's signature and its class file beside it (``<stem>_classes``); returns `path`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    k = detections
    weight = (rng.standard_normal((3, k)) * 0.01).astype(np.float32)
    per_row = (rng.standard_normal((1, k)) * 0.0008).astype(np.float32)
    bias = (rng.standard_normal((1, k)) * 0.5).astype(np.float32)
    labels = (np.arange(k, dtype=np.int32) * 5 % len(V2_DEFAULT_CLASSES)).reshape(1, k)
    boxes = (rng.random((1, k, 4)) * 100).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input_1"], ["means"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["means", "weight"], ["colour"]),
        helper.make_node("Shape", ["input_1"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["height_int"]),
        helper.make_node("Cast", ["height_int"], ["height"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["height", "per_row"], ["size_term"]),
        helper.make_node("Add", ["colour", "size_term"], ["z0"]),
        helper.make_node("Add", ["z0", "bias"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["scores"]),
        helper.make_node("Identity", ["labels_const"], ["labels"]),
        helper.make_node("Identity", ["boxes_const"], ["boxes"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nudenet_v2_detector_double",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [1, "H", "W", 3])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, k, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, k]),
            helper.make_tensor_value_info("labels", TensorProto.INT32, [1, k]),
        ],
        [
            numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(per_row, "per_row"),
            numpy_helper.from_array(bias, "bias"),
            numpy_helper.from_array(labels, "labels_const"),
            numpy_helper.from_array(boxes, "boxes_const"),
        ],
    )
    path = _save(graph, path)
    (path.parent / f"{path.stem}_classes").write_text("\n".join(V2_DEFAULT_CLASSES) + "\n")
    return path
