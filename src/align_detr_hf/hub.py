"""The Hub side of Align-DETR: our code in every saved folder, and a model card on every push.

Ownership: `register_owned_saves()` (run once when `align_detr_hf` is imported) makes `save_pretrained` of our config,
models and image processor follow the package's one write rule ([`file_io`]): a save is written in a staging folder,
then each file is moved into place where it may replace only a file that an earlier save wrote and nobody changed
since (`save_pretrained(..., overwrite=True)`: any); other files in the folder are kept, and every file gets the
modes of any new file (safetensors writes 0600). The model card and the copied code follow the same rule.

Remote code: `register_remote_code()` (run once when `align_detr_hf` is imported) registers the config, both
model classes and both image-processor backends for their Auto classes, permanently. From then on every
`save_pretrained` / `push_to_hub` (a plain call, `Trainer` checkpoints, `trainer.push_to_hub`, our training scripts,
the converter) writes `auto_map` and copies the defining modules with their relative imports (the pipeline and image
reading too; the model's save also names the pipeline in `custom_pipelines`), so the folder loads with
`trust_remote_code=True` on a machine without this package. The Triton kernel module is imported with `from . import`
inside a `try` and is therefore not copied (transformers only follows `from .module import`): remote code runs the
pure-PyTorch deformable attention, with identical results.

Model cards: `build_model_card` / `write_model_card` make a card from huggingface_hub's `ModelCard`,
`ModelCardData` and `EvalResult` (the model-index holds the COCO metrics). `ModelCardCallback` keeps the facts during
a `Trainer` run (last evaluation, hyper-parameters) and writes the card into every checkpoint and before every push;
`ModelCardTrainerMixin` makes `trainer.push_to_hub()` use it instead of the generic Trainer card;
`push_to_hub_with_model_card` is what `AlignDetrPreTrainedModel.push_to_hub` runs.
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import TrainerCallback
from transformers.dynamic_module_utils import custom_object_save
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .configuration_align_detr import AlignDetrConfig
from .evaluation import METRIC_NAMES
from .file_io import MANIFEST_NAME, owned_file, owned_files_in
from .image_processing_align_detr import AlignDetrImageProcessor, AlignDetrImageProcessorBase
from .image_processing_pil_align_detr import AlignDetrImageProcessorPil
from .modeling_align_detr import AlignDetrForObjectDetection, AlignDetrModel, AlignDetrPreTrainedModel

__all__ = [
    "AUTO_CLASSES",
    "ModelCardCallback",
    "ModelCardTrainerMixin",
    "build_model_card",
    "copy_remote_code",
    "push_folder_to_hub",
    "push_to_hub_with_model_card",
    "register_owned_saves",
    "register_remote_code",
    "training_card_kwargs",
    "write_model_card",
]

# Our class -> the Auto class written into `auto_map` when it is saved.
AUTO_CLASSES = {
    AlignDetrConfig: "AutoConfig",
    AlignDetrModel: "AutoModel",
    AlignDetrForObjectDetection: "AutoModelForObjectDetection",
    AlignDetrImageProcessor: "AutoImageProcessor",
    AlignDetrImageProcessorPil: "AutoImageProcessor",
}

README = "README.md"
# the local record of what this package wrote (file_io) is not part of a model repository
NOT_UPLOADED = [MANIFEST_NAME, f"**/{MANIFEST_NAME}"]
EVALUATION_FOLDER = "evaluation"  # a saved model's report pictures, linked from its card
# transformers' placeholder card (`create_and_tag_model_card`), e.g. from pushing the image processor first
_GENERIC_CARD_TEXT = "This model card has been automatically generated."

_METRIC_LABELS = {
    "map": "AP @ IoU 0.50:0.95",
    "map_50": "AP @ IoU 0.50",
    "map_75": "AP @ IoU 0.75",
    "map_small": "AP (small objects)",
    "map_medium": "AP (medium objects)",
    "map_large": "AP (large objects)",
    "mar_1": "AR @ 1 detection",
    "mar_10": "AR @ 10 detections",
    "mar_100": "AR @ 100 detections",
}

ALIGN_DETR_CITATION = """@article{cai2023aligndetr,
  title   = {Align-DETR: Improving DETR with Simple IoU-aware BCE loss},
  author  = {Cai, Zhi and Liu, Songtao and Wang, Guodong and Ge, Zheng and Zhang, Xiangyu and Huang, Di},
  journal = {arXiv preprint arXiv:2304.07527},
  year    = {2023}
}"""

# Jinja template (huggingface_hub renders it; the YAML header comes from ModelCardData).
_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}

{{ architecture }} This checkpoint is stored as a Hugging Face `transformers` model; the folder also holds
the model's code, so it loads with `trust_remote_code=True` where the `align-detr-hf` package is not installed.

{% if base_model %}- **Base model:** {{ base_model }}
{% endif %}{% if datasets %}- **Training data:** {{ datasets | join(", ") }}
{% endif %}{% if source %}- **Source:** {{ source }}
{% endif %}- **Classes:** {{ num_labels }}{% if labels %} ({{ labels }}){% endif %}
- **License:** {{ license }}

## Usage

```python
from transformers import pipeline

detector = pipeline("object-detection", model="{{ model_id }}", trust_remote_code=True)
detector("image.jpg", threshold=0.3)  # [{"score", "label", "box": {"xmin", "ymin", "xmax", "ymax"}}, ...]
```

Or step by step (with `align-detr-hf` installed, `import align_detr_hf` and `trust_remote_code` is not needed):

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForObjectDetection

processor = AutoImageProcessor.from_pretrained("{{ model_id }}", trust_remote_code=True)
model = AutoModelForObjectDetection.from_pretrained("{{ model_id }}", trust_remote_code=True).eval()
image = Image.open("image.jpg").convert("RGB")
with torch.no_grad():
    outputs = model(**processor(images=image, return_tensors="pt"))
detections = processor.post_process_object_detection(
    outputs, threshold=0.3, target_sizes=[(image.height, image.width)]
)[0]
```
{% if metrics %}
## Evaluation

COCO-style metrics (pycocotools, 0-1 scale){% if dataset_name %} on {{ dataset_name }}{% endif %}:

| metric | value |
|---|---|
{% for name, label, value in metrics %}| {{ label }} (`{{ name }}`) | {{ "%.4f" | format(value) }} |
{% endfor %}{% endif %}{% if evaluation_pictures %}
## What the model gets wrong

From the last evaluation ([report]({{ evaluation_folder }}/report.md), written by `align-detr evaluate` or at the end
of training):
{% for title, path in evaluation_pictures %}
**{{ title }}**

![{{ title }}]({{ path }})
{% endfor %}{% endif %}{% if hyperparameters %}
## Training hyper-parameters

| name | value |
|---|---|
{% for name, value in hyperparameters %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}
## Citation

```bibtex
{{ citation }}
```
"""


# ------------------------------------------------------------------------------------------------ ownership

SAVE_WRITER = "save_pretrained"  # how our saves (and the model card, the copied code) are recorded (file_io)
# the weight files of a save: those of an earlier save that this one does not renew (e.g. shards) are removed
_staging: contextvars.ContextVar[bool] = contextvars.ContextVar("align_detr_saving", default=False)
_WEIGHT_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def owned_save(save):
    """Wrap a `save_pretrained` so that it follows the ownership rule (see the module docstring)."""

    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, overwrite: bool = False, **kwargs):
        if _staging.get():  # a save inside ours (the model saves its config): into our staging folder as it is
            return save(self, save_directory, *args, **kwargs)
        if kwargs.get("push_to_hub"):  # transformers names the repository after the folder it is given
            kwargs.setdefault("repo_id", Path(save_directory).name)
        with owned_files_in(save_directory, SAVE_WRITER, overwrite=overwrite, stale=_WEIGHT_FILES.fullmatch) as staging:
            token = _staging.set(True)
            try:
                saved = save(self, staging, *args, **kwargs)
            finally:
                _staging.reset(token)
        return _moved_paths(saved, staging, Path(save_directory))

    save_pretrained.owned = True
    return save_pretrained


def _moved_paths(saved, staging: Path, folder: Path):
    """What a save returned, with its paths in the staging folder given where they now lie (transformers returns
    the written files, e.g. for `check_json_file_has_correct_format`)."""
    if isinstance(saved, (list, tuple)):
        return type(saved)(_moved_paths(item, staging, folder) for item in saved)
    if isinstance(saved, (str, os.PathLike)):
        try:
            relative = Path(saved).relative_to(staging)
        except ValueError:
            return saved
        return type(saved)(folder / relative) if isinstance(saved, str) else folder / relative
    return saved


def register_owned_saves() -> None:
    """Make `save_pretrained` of our config, models and image processor follow the ownership rule (idempotent)."""
    for cls in (AlignDetrConfig, AlignDetrPreTrainedModel, AlignDetrImageProcessorBase):
        if not getattr(cls.save_pretrained, "owned", False):
            cls.save_pretrained = owned_save(cls.save_pretrained)


# ------------------------------------------------------------------------------------------------ remote code


def register_remote_code() -> None:
    """Make every save of our classes write `auto_map` and copy our code (idempotent; run at import)."""
    for cls, auto_class in AUTO_CLASSES.items():
        cls.register_for_auto_class(auto_class)


@contextmanager
def saving_remote_code():
    """Backwards compatibility: saves carry our code anyway since `register_remote_code` runs at import."""
    register_remote_code()
    yield


def copy_remote_code(save_directory: str | os.PathLike) -> list[Path]:
    """Copy the modules defining our classes (and their relative imports) into `save_directory`.

    For folders assembled without `save_pretrained`, e.g. the Trainer's output folder before a push from a checkpoint
    (transformers copies only weights and config there)."""
    names = set()
    with owned_files_in(save_directory, SAVE_WRITER) as staging:
        for cls in AUTO_CLASSES:
            names.update(Path(p).name for p in custom_object_save(cls, staging))
    return sorted(Path(save_directory) / name for name in names)


# ------------------------------------------------------------------------------------------------ model card


def _is_repo_id(name: str | None) -> bool:
    """A Hub id (`org/name` or `name`), not a local folder: only those may go into the card's metadata."""
    if not name or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _coco_metrics(metrics: dict[str, float] | None) -> list[tuple[str, str, float]]:
    """(name, label, value) of the COCO metrics in `metrics`; `eval_`/`test_` prefixes (Trainer) are dropped,
    other keys and pycocotools' -1 ("no such objects") left out."""
    found = {}
    for key, value in (metrics or {}).items():
        name = key.split("_", 1)[1] if key.startswith(("eval_", "test_")) else key
        if name in METRIC_NAMES and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
            found[name] = float(value)
    return [(name, _METRIC_LABELS[name], found[name]) for name in METRIC_NAMES if name in found]


def build_model_card(
    *,
    model_name: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    dataset_name: str | None = None,
    hyperparameters: dict | None = None,
    source: str | None = None,
    license: str = "apache-2.0",
    citation: str | None = None,
    description: str | None = None,
    id2label: dict[int, str] | None = None,
    architecture: str | None = None,
    evaluation_pictures: list[tuple[str, str]] | None = None,
) -> ModelCard:
    """An Align-DETR model card: metadata (license, base model, datasets, tags, model-index with the COCO metrics)
    from `ModelCardData` / `EvalResult`, and a body with a usage snippet, the metrics and the hyper-parameters.

    `model_name` is the Hub id (used in the usage snippet and as the model-index name); `metrics` may hold Trainer
    keys (`eval_map`); `datasets` are Hub dataset ids (local paths are shown in the text only, as is a local
    `base_model`); `dataset_name` is the readable name of the evaluation data.
    """
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    coco = _coco_metrics(metrics)
    hub_datasets = [d for d in datasets if _is_repo_id(d)]
    index_name = model_name or "align-detr"
    eval_results = [
        EvalResult(
            task_type="object-detection",
            task_name="Object Detection",
            dataset_type=hub_datasets[0] if hub_datasets else "custom",
            dataset_name=dataset_name or (datasets[0] if datasets else "custom"),
            metric_type=name,
            metric_name=label,
            metric_value=round(value, 4),
        )
        for name, label, value in coco
    ]
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="object-detection",
        tags=["object-detection", "vision", "align-detr", "dino", "detr"],
        base_model=base_model if _is_repo_id(base_model) else None,
        datasets=hub_datasets or None,
        model_name=index_name if eval_results else None,
        eval_results=eval_results or None,
    )
    labels = None
    if id2label:
        names = [id2label[i] for i in sorted(id2label)]
        labels = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        title=model_name.split("/")[-1] if model_name else "Align-DETR",
        description=description or "An Align-DETR object detector.",
        model_id=model_name if _is_repo_id(model_name) else "path/to/this/folder",
        base_model=base_model,
        datasets=datasets,
        source=source,
        license=license,
        num_labels=len(id2label) if id2label else "see `config.id2label`",
        labels=labels,
        metrics=coco,
        dataset_name=dataset_name,
        hyperparameters=[(str(k), v) for k, v in (hyperparameters or {}).items()],
        citation=citation or ALIGN_DETR_CITATION,
        architecture=architecture or describe_architecture({}),
        evaluation_pictures=evaluation_pictures or [],
        evaluation_folder=EVALUATION_FOLDER,
    )


def write_model_card(
    save_directory,
    *,
    model_name: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    dataset_name: str | None = None,
    hyperparameters: dict | None = None,
    source: str | None = None,
    license: str = "apache-2.0",
    citation: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
) -> ModelCard:
    """Build the card (see `build_model_card`) and write it to `save_directory/README.md` atomically (a temporary
    file renamed over the old one), which may replace only a card written by us and unchanged since, unless
    `overwrite`. The class names come from the folder's `config.json` when there is one."""
    save_directory = Path(save_directory)
    if save_directory.exists() and not save_directory.is_dir():
        raise NotADirectoryError(f"write_model_card needs a folder, got the file {save_directory}.")
    save_directory.mkdir(parents=True, exist_ok=True)
    config_file = save_directory / "config.json"
    folder_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    from .evaluation_report import report_pictures

    # the pictures of `write_evaluation_report` in <folder>/evaluation (the training scripts write them there)
    pictures = [(title, f"{EVALUATION_FOLDER}/{name}") for title, name in
                report_pictures(save_directory / EVALUATION_FOLDER)]
    card = build_model_card(
        model_name=model_name, base_model=base_model, datasets=datasets, metrics=metrics, dataset_name=dataset_name,
        hyperparameters=hyperparameters, source=source, license=license, citation=citation, description=description,
        id2label=_folder_id2label(folder_config), architecture=describe_architecture(folder_config),
        evaluation_pictures=pictures,
    )
    with owned_file(save_directory / README, SAVE_WRITER, overwrite=overwrite) as temp:
        temp.write_bytes(str(card).encode("utf-8"))
    return card


def _folder_id2label(config: dict) -> dict[int, str] | None:
    return {int(k): v for k, v in (config.get("id2label") or {}).items()} or None


def describe_architecture(config: dict) -> str:
    """One sentence on the network and its training loss, from a saved `config.json` (defaults where it is empty)."""
    backbone = (config.get("backbone_config") or {}).get("model_type", "resnet")
    backbone = {"resnet": "ResNet", "swin": "Swin Transformer", "convnext": "ConvNeXt"}.get(backbone, backbone)
    levels = config.get("num_feature_levels", 4)
    if config.get("loss_type", "align_detr") == "dino":
        loss = "DINO's loss (sigmoid focal loss, one-to-one Hungarian matching)"
    else:
        loss = "the Align-DETR loss (IoU-aware BCE, mixed one-to-k matching, prime-sample weighting)"
    return (f"A DINO-{levels}scale detector ({backbone} backbone, {levels}-level deformable encoder and decoder, "
            f"two-stage query selection, contrastive denoising, look-forward-twice box refinement) trained with {loss}.")


def push_to_hub_with_model_card(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    **card_kwargs,
):
    """`model.push_to_hub`, with our model card: weights, config, code and README.md in one commit.

    As transformers does, a card already in the repository is kept (only `tags` are added), unless it is
    transformers' placeholder; otherwise ours is built from `card_kwargs` (see `build_model_card`) and the model's
    config (`_name_or_path` as the base model)."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as work_dir:
        model.save_pretrained(work_dir, max_shard_size=max_shard_size)
        try:
            card = ModelCard.load(repo_id, token=token)
        except EntryNotFoundError:
            card = None
        if card is None or _GENERIC_CARD_TEXT in card.text:  # none, or transformers' placeholder (processor pushed first)
            card_kwargs.setdefault("base_model", getattr(model.config, "_name_or_path", None) or None)
            card = write_model_card(work_dir, model_name=repo_id, **card_kwargs)
        for tag in tags or []:
            card.data.tags = list(card.data.tags or [])
            if tag not in card.data.tags:
                card.data.tags.append(tag)
        card.save(os.path.join(work_dir, README))
        return api.upload_folder(
            repo_id=repo_id, folder_path=work_dir, commit_message=commit_message or "Upload Align-DETR model",
            commit_description=commit_description, revision=revision, create_pr=create_pr,
            ignore_patterns=NOT_UPLOADED,
        )


def push_folder_to_hub(folder, repo_id: str, *, commit_message: str = "Upload Align-DETR model", private=None,
                       token=None) -> str:
    """Upload a saved folder (weights, config, processor, code, README.md) to `repo_id` as one commit."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             ignore_patterns=NOT_UPLOADED)


def training_card_kwargs(
    *,
    model_name_or_path: str | None = None,
    dataset_name: str | None = None,
    train_annotation: str | None = None,
    synthetic_shapes: int = 0,
    hub_model_id: str | None = None,
    hyperparameters: dict | None = None,
) -> dict:
    """`write_model_card` arguments from a training script's flags (base model, data, Hub id, recipe)."""
    if dataset_name:
        datasets, readable = [dataset_name], dataset_name
    elif synthetic_shapes:
        datasets, readable = ["synthetic shapes (align_detr_hf.synthetic)"], "synthetic shapes (validation split)"
    elif train_annotation:
        datasets, readable = [train_annotation], "COCO-format data (validation split)"
    else:
        datasets, readable = None, None
    return {
        "model_name": hub_model_id,
        "base_model": model_name_or_path,
        "datasets": datasets,
        "dataset_name": readable,
        "hyperparameters": {k: v for k, v in (hyperparameters or {}).items() if v is not None},
    }


# ------------------------------------------------------------------------------------------------ Trainer


class ModelCardCallback(TrainerCallback):
    """Keeps the model card's facts during a `Trainer` run and writes README.md (with our code) where models are saved.

    - `on_evaluate`: remembers the COCO metrics of the last evaluation;
    - `on_save`: writes the card into the new `checkpoint-N` folder;
    - `on_push_begin`: writes the card and our code into the output folder (a push from a checkpoint copies only the
      weights and the config there).
    Hyper-parameters default to the Trainer's arguments; `card_kwargs` (see `build_model_card`) add or override.
    """

    def __init__(self, **card_kwargs):
        self.card_kwargs = card_kwargs
        self.metrics: dict[str, float] | None = None
        self.trainer_hyperparameters: dict = {}
        self.hub_model_id: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer_hyperparameters = trainer_hyperparameters(args)
        self.hub_model_id = args.hub_model_id

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if _coco_metrics(metrics):
            self.metrics = dict(metrics)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and checkpoint.is_dir():
            self.write(checkpoint, default_model_name=args.hub_model_id)
            adopt_checkpoint_copies(checkpoint, args.output_dir)

    def on_push_begin(self, args, state, control, **kwargs):
        if args.should_save:
            copy_remote_code(args.output_dir)
            self.write(args.output_dir, default_model_name=args.hub_model_id)

    def write(self, save_directory, default_model_name: str | None = None, **overrides) -> ModelCard:
        kwargs = {**self.card_kwargs, **overrides}
        kwargs["hyperparameters"] = {**self.trainer_hyperparameters, **(kwargs.get("hyperparameters") or {})}
        kwargs.setdefault("metrics", self.metrics)
        if kwargs.get("model_name") is None:
            kwargs["model_name"] = default_model_name or self.hub_model_id
        return write_model_card(save_directory, **kwargs)


def adopt_checkpoint_copies(checkpoint, output_dir) -> list[Path]:
    """Record as ours the files of `output_dir` that are byte copies of files our save wrote in `checkpoint`.

    A Trainer pushing to the Hub from checkpoints copies the weights and config of each new checkpoint into its output
    folder with `shutil.copy`; without this, the final `save_model()` there would refuse them as files it did not
    write. Only exact copies of our own files are adopted, so nothing the user wrote becomes ours."""
    from .file_io import is_own_output, read_manifest, record_output, sha256_of_file

    adopted = []
    for name, entry in read_manifest(Path(checkpoint)).items():
        source, copy = Path(checkpoint) / name, Path(output_dir) / name
        if (copy.is_file() and not copy.is_symlink() and copy.stat().st_size == entry.get("size")
                and not is_own_output(copy, SAVE_WRITER) and is_own_output(source, SAVE_WRITER)
                and sha256_of_file(copy) == entry.get("sha256")):  # fmt: skip
            adopted.append(copy)
    record_output(adopted, SAVE_WRITER)
    return adopted


def trainer_hyperparameters(args) -> dict:
    """The training hyper-parameters of `TrainingArguments` a model card shows."""
    hyperparameters = {
        "learning_rate": args.learning_rate,
        "train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
        * max(1, args.world_size),
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "seed": args.seed,
    }
    if args.max_steps > 0:
        hyperparameters["training_steps"] = args.max_steps
    else:
        hyperparameters["num_epochs"] = args.num_train_epochs
    if args.fp16 or args.bf16:
        hyperparameters["mixed_precision"] = "fp16" if args.fp16 else "bf16"
    return hyperparameters


class ModelCardTrainerMixin:
    """Mix into a `transformers.Trainer` subclass (before `Trainer`): `trainer.push_to_hub()` then writes our card,
    from the `ModelCardCallback` among the trainer's callbacks, instead of the generic Trainer card."""

    def create_model_card(self, model_name=None, finetuned_from=None, dataset=None, license=None, **kwargs):
        callback = next((c for c in self.callback_handler.callbacks if isinstance(c, ModelCardCallback)), None)
        if callback is None:
            return super().create_model_card(
                model_name=model_name, finetuned_from=finetuned_from, dataset=dataset, license=license, **kwargs
            )
        if self.is_world_process_zero():
            # what `trainer.push_to_hub(finetuned_from=..., dataset=..., license=...)` says wins over the callback
            overrides = {"base_model": finetuned_from, "license": license,
                         "datasets": [dataset] if isinstance(dataset, str) else dataset}
            callback.write(self.args.output_dir, default_model_name=self.args.hub_model_id or model_name,
                           **{key: value for key, value in overrides.items() if value})
