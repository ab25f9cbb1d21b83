"""NudeNet v2's classifier and RetinaNet detector (notAI-tech/NudeNet v2.0.9), fed exactly as v2 fed them.
v2 cannot be installed any more; the user supplies its ONNX files. Pure NumPy/PIL/OpenCV; no judge logic.

* **Classifier** (``classifier_model.onnx``, ``nudenet/classifier.py`` + ``image_utils.py``): the image as
  RGB, resized to 256×256 with PIL's *nearest* filter (skipped when already 256×256), float32 / 255,
  channels last, a batch (N, 256, 256, 3); the output's two columns are ``unsafe``, ``safe``.
* **Detector** (``detector_v2_base_checkpoint.onnx`` or ``…_default_…``, ``nudenet/detector.py`` +
  ``detector_utils.py``): the image as RGB reversed to B, G, R, float32 minus the Caffe means
  (103.939, 116.779, 123.68), scaled by min(800 / shorter side, 1333 / longer side) with ``cv2.resize``
  (bilinear), one image at a time (1, H, W, 3); the outputs are boxes, scores (float32) and labels
  (int32, indices into the class file that comes with the checkpoint).
"""

from __future__ import annotations

import numpy as np

CLASSIFIER_SIZE = 256
CLASSIFIER_CATEGORIES = ("unsafe", "safe")
CAFFE_MEANS = (103.939, 116.779, 123.68)
MIN_SIDE, MAX_SIDE = 800, 1333
#: v3 names of the exposed-part labels → v2's (v2 has no separate anus class in its base model).
V3_TO_V2 = {
    "ANUS_EXPOSED": "EXPOSED_ANUS",
    "BUTTOCKS_EXPOSED": "EXPOSED_BUTTOCKS",
    "FEMALE_BREAST_EXPOSED": "EXPOSED_BREAST_F",
    "FEMALE_GENITALIA_EXPOSED": "EXPOSED_GENITALIA_F",
    "MALE_GENITALIA_EXPOSED": "EXPOSED_GENITALIA_M",
    "MALE_BREAST_EXPOSED": "EXPOSED_BREAST_M",
    "FEET_EXPOSED": "EXPOSED_FEET",
    "BELLY_EXPOSED": "EXPOSED_BELLY",
    "ARMPITS_EXPOSED": "EXPOSED_ARMPITS",
}


def classifier_input(images) -> np.ndarray:
    """(N, 256, 256, 3) float32 for RGB PIL images, as v2's ``load_images`` made it."""
    from PIL import Image

    rows = []
    for image in images:
        if image.size != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
            image = image.resize((CLASSIFIER_SIZE, CLASSIFIER_SIZE), Image.NEAREST)
        rows.append(np.asarray(image, dtype=np.float32) / 255)
    return np.stack(rows)


def detector_input(image) -> np.ndarray:
    """(1, H, W, 3) float32 for one RGB PIL image, as v2's ``preprocess_image`` made it (I2P's 'PIL' mode)."""
    import cv2

    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1]).astype(np.float32)
    bgr -= np.array(CAFFE_MEANS, dtype=np.float32)
    rows, cols = bgr.shape[:2]
    scale = MIN_SIDE / min(rows, cols)
    if max(rows, cols) * scale > MAX_SIDE:
        scale = MAX_SIDE / max(rows, cols)
    return cv2.resize(bgr, None, fx=scale, fy=scale)[None]


def split_detector_outputs(outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, scores, labels) of one image from the detector's three outputs, told apart as v2 did:
    labels are the int32 output, scores the 2-D float one, boxes the 3-D one."""
    labels = next(o for o in outputs if o.dtype == np.int32)
    scores = next(o for o in outputs if o.dtype != np.int32 and o.ndim == 2)
    boxes = next(o for o in outputs if o.ndim == 3)
    return boxes[0], scores[0], labels[0]


def read_classes(path) -> list[str]:
    """The class file that comes with a v2 detector checkpoint: one name a line."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
