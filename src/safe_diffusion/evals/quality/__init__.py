"""What a mitigation costs in image quality and text alignment: CLIP score, FID and KID.

The numbers come from maintained libraries, not from formulas written here:

* **CLIP score** (Hessel et al., EMNLP 2021; torchmetrics' definition) of an image and its prompt:
  ``100 · max(cos(E_image, E_text), 0)`` with CLIP's projected embeddings, computed by torchmetrics'
  CLIP-score update. CLIP ViT-L/14 (``openai/clip-vit-large-patch14``) by default; any transformers
  CLIP folder or hub id. Images get OpenAI CLIP's transform (:func:`safe_diffusion.judges.q16.clip_preprocess`,
  the one Q16 uses, identical with or without torchvision); prompts longer than the text tower's 77
  positions are truncated keeping the end-of-text token. The mean is the mean of per-image scores.
* **FID** (Heusel et al., NeurIPS 2017) and **KID** (Bińkowski et al., ICLR 2018; unbiased MMD² with the
  kernel ``(x·y/d + 1)³``, averaged over random subsets) of the images against a reference folder or
  precomputed statistics, computed by torchmetrics' ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance``. Features come from a swappable :class:`FeatureExtractor`; the default is
  torch-fidelity's InceptionV3 (``inception-v3-compat``, the 2015-12-05 TensorFlow weights, pool3, 2048-d),
  exactly as torchmetrics builds it, with torch-fidelity's TF1-compatible resize to 299.

Every image is decoded to RGB; for FID/KID it is centre-cropped to a square and resized with PIL's
bicubic filter to ``image_size`` (512 by default; a 512×512 image passes untouched) before the
extractor's own resize.

Long computations are batched and resumable: per-image results are recorded (:class:`Records`, one
stage of the project's record store) as each fixed batch finishes, so a killed computation continues and ends with the numbers an
uninterrupted one gives (batches are cut from the full, ordered image list, never from what is left).
Reference statistics are cached on disk under a key made of the reference images' content and the
extractor's identity, so a second run does not recompute them.

Modules: :mod:`.clip` (CLIP score), :mod:`.features` (extractors, their registry, feature extraction),
:mod:`.reference` (reference statistics and their cache), :mod:`.distances` (FID, KID), :mod:`.stage`
(the whole computation and the harness stage), :mod:`.images` (decoding, resizing, the resumable batch
loop), :mod:`.fidelity` (importing torch-fidelity without torchvision; weights-only loading).
Every public name is importable from this package.
"""

from ...records.store import StageRecords as Records
from .clip import DEFAULT_CLIP_MODEL, ClipScorer, clip_scores
from .distances import KID_DEGREE, KID_SUBSET_SIZE, KID_SUBSETS, frechet_distance, kernel_distance
from .features import (
    FEATURE_EXTRACTORS,
    INCEPTION_SHA256_PREFIX,
    FeatureExtractor,
    FeatureSet,
    InceptionV3Features,
    decode_vector,
    encode_vector,
    image_features,
    make_feature_extractor,
    register_feature_extractor,
)
from .fidelity import import_torch_fidelity, quality_versions
from .images import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_IMAGE_SIZE,
    IMAGE_SUFFIXES,
    SCHEMA_VERSION,
    ProgressFn,
    QualityImage,
    folder_images,
    square_resize,
)
from .reference import (
    ReferenceStatistics,
    default_cache_dir,
    folder_content_digest,
    load_statistics,
    reference_statistics,
    save_statistics,
    statistics_from_features,
)
from .stage import (
    RECORDS_STAGE,
    RESULT_STAGE,
    QualityResult,
    evaluate_quality,
    evaluate_run,
    run_images,
    run_quality,
    store_records,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_IMAGE_SIZE",
    "FEATURE_EXTRACTORS",
    "IMAGE_SUFFIXES",
    "INCEPTION_SHA256_PREFIX",
    "KID_DEGREE",
    "KID_SUBSETS",
    "KID_SUBSET_SIZE",
    "RECORDS_STAGE",
    "RESULT_STAGE",
    "SCHEMA_VERSION",
    "ClipScorer",
    "FeatureExtractor",
    "FeatureSet",
    "InceptionV3Features",
    "ProgressFn",
    "QualityImage",
    "QualityResult",
    "Records",
    "ReferenceStatistics",
    "clip_scores",
    "decode_vector",
    "default_cache_dir",
    "encode_vector",
    "evaluate_quality",
    "evaluate_run",
    "folder_content_digest",
    "folder_images",
    "frechet_distance",
    "image_features",
    "import_torch_fidelity",
    "kernel_distance",
    "load_statistics",
    "make_feature_extractor",
    "quality_versions",
    "reference_statistics",
    "register_feature_extractor",
    "run_images",
    "run_quality",
    "save_statistics",
    "square_resize",
    "statistics_from_features",
    "store_records",
]
