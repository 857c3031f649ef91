"""Hub integration: every save carries our code (a Trainer run's folders load and detect in a process that cannot
import align_detr_hf), and model cards carry their metadata (license, base model, datasets, COCO model-index)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from huggingface_hub import ModelCard
from PIL import Image
from transformers import Trainer, TrainingArguments

import align_detr_hf
from align_detr_hf import AlignDetrForObjectDetection, AlignDetrImageProcessor, hub
from align_detr_hf.hub import ModelCardCallback, ModelCardTrainerMixin, build_model_card, write_model_card

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# ~0.1 M-parameter demo model on 48-64 px synthetic images (as tests/test_training.py)
TINY = ["--synthetic_shapes", "12", "--synthetic_image_size", "64", "--demo_model", "--d_model", "32",
        "--num_queries", "10", "--image_scale", "0.08", "--warmup_steps", "2", "--seed", "3"]
CODE_FILES = {"configuration_align_detr.py", "modeling_align_detr.py", "image_processing_align_detr.py",
              "image_processing_pil_align_detr.py", "loss_align_detr.py", "box_ops.py",
              "ms_deform_attn.py", "ms_deform_attn_gather.py", "backbone_align_detr.py", "denoising_align_detr.py",
              "matching_align_detr.py", "targets_align_detr.py", "pipeline_align_detr.py", "image_io.py", "slicing.py"}
SIZE = {"shortest_edge": 64, "longest_edge": 96}

# What a Hub user has: transformers, torch, Pillow, but neither this package nor scipy (inference must not need it).
# A sitecustomize.py on PYTHONPATH makes both "not installed" for `import` and for transformers' availability checks.
BLOCKER = """
import sys
for name in ("align_detr_hf", "scipy"):
    sys.modules[name] = None
"""
# Loads FOLDER with trust_remote_code, runs the pipeline on the images of IO, all in one call with `batch_size`
# (images of different sizes batched together), and prints its results as JSON.
REMOTE_SCRIPT = """
import json, logging, sys, torch
from PIL import Image
from transformers import pipeline
folder, io, batch_size = sys.argv[1], torch.load(sys.argv[2], weights_only=True), int(sys.argv[3])
messages = []
logging.getLogger("transformers").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: messages.append(
    r.getMessage())})())
detector = pipeline("object-detection", model=folder, trust_remote_code=True)
assert type(detector).__module__.startswith("transformers_modules"), type(detector).__module__  # our pipeline
assert type(detector.model).__module__.startswith("transformers_modules"), type(detector.model).__module__
assert type(detector.image_processor).__name__.startswith("AlignDetrImageProcessor")
assert not [m for m in messages if "is not supported" in m], messages
images = [Image.fromarray(a.numpy()) for a in io["images"]]
results = detector(images, threshold=0.0, batch_size=batch_size)
assert sys.modules["align_detr_hf"] is None and sys.modules["scipy"] is None
print("RESULTS" + json.dumps(results))
"""


def run_without_package(folder: Path, images: list[Image.Image], tmp_path: Path, batch_size: int = 1):
    """Pipeline results (one list per image) from `folder` in a fresh process where neither align_detr_hf nor scipy
    can be imported."""
    io = tmp_path / "io.pt"
    torch.save({"images": [torch.from_numpy(np.array(image)) for image in images]}, io)
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(blocker)}
    result = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(io), str(batch_size)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("RESULTS")[-1])


class ShapesDataset(torch.utils.data.Dataset):
    """A few random 64 px images with one box each: enough for Trainer steps, evaluation and saving."""

    def __init__(self, n=4):
        generator = torch.Generator().manual_seed(0)
        self.items = [
            {"pixel_values": torch.randn(3, 64, 64, generator=generator),
             "labels": {"class_labels": torch.tensor([i % 3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])}}
            for i in range(n)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def collate(batch):
    return {"pixel_values": torch.stack([b["pixel_values"] for b in batch]), "labels": [b["labels"] for b in batch]}


class CardTrainer(ModelCardTrainerMixin, Trainer):
    pass


FIXED_METRICS = {"map": 0.3125, "map_50": 0.5, "map_75": 0.25, "mar_100": 0.4375}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step Trainer fine-tune with evaluation and a checkpoint, then the final save (as the example does)."""
    out = tmp_path_factory.mktemp("trainer_run")
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config())
    card = ModelCardCallback(base_model="org/align-detr-r50", datasets=["cppe-5"], dataset_name="CPPE-5 (val)",
                             hyperparameters={"backbone_lr_mult": 0.1})
    args = TrainingArguments(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        learning_rate=1e-4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        logging_steps=1, report_to="none", remove_unused_columns=False, eval_do_concat_batches=False,
        use_cpu=True, dataloader_num_workers=0, seed=0, hub_model_id="someone/align-detr-shapes",
    )
    trainer = CardTrainer(
        model=model, args=args, train_dataset=ShapesDataset(), eval_dataset=ShapesDataset(2), data_collator=collate,
        processing_class=AlignDetrImageProcessor(size=SIZE), compute_metrics=lambda _: dict(FIXED_METRICS),
        callbacks=[card],
    )
    torch.set_num_threads(1)
    trainer.train()
    final = out / "final"
    trainer.save_model(str(final))
    card.write(final)
    return trainer, out, final


def test_auto_model_loads_the_base_model_from_a_detection_folder(tmp_path):
    """As with transformers' own DETRs: AutoModel on a detection checkpoint gives the base model, same weights."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config())
    model.save_pretrained(tmp_path / "head")
    base = AutoModel.from_pretrained(tmp_path / "head", trust_remote_code=True)
    assert type(base).__name__ == "AlignDetrModel"
    expected = model.model.state_dict()
    got = base.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=0, rtol=0, msg=name)


def test_every_save_writes_auto_map_and_code(tmp_path):
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config())
    model.save_pretrained(tmp_path / "head")
    model.model.save_pretrained(tmp_path / "base")
    AlignDetrImageProcessor().save_pretrained(tmp_path / "head")
    head = json.loads((tmp_path / "head" / "config.json").read_text())["auto_map"]
    assert head == {"AutoConfig": "configuration_align_detr.AlignDetrConfig",
                    "AutoModel": "modeling_align_detr.AlignDetrModel",
                    "AutoModelForObjectDetection": "modeling_align_detr.AlignDetrForObjectDetection"}
    base = json.loads((tmp_path / "base" / "config.json").read_text())["auto_map"]
    assert base["AutoModel"] == "modeling_align_detr.AlignDetrModel"
    processor = json.loads((tmp_path / "head" / "preprocessor_config.json").read_text())["auto_map"]
    assert processor == {"AutoImageProcessor": {"torchvision": "image_processing_align_detr.AlignDetrImageProcessor",
                                                "pil": "image_processing_pil_align_detr.AlignDetrImageProcessorPil"}}
    pipelines = json.loads((tmp_path / "head" / "config.json").read_text())["custom_pipelines"]
    assert pipelines == {"object-detection": {"impl": "pipeline_align_detr.AlignDetrObjectDetectionPipeline",
                                              "pt": ["AutoModelForObjectDetection"], "type": "image"}}
    assert CODE_FILES <= {p.name for p in (tmp_path / "head").glob("*.py")}
    # the copies are our modules, byte for byte
    package = Path(align_detr_hf.__file__).parent
    for name in CODE_FILES:
        assert (tmp_path / "head" / name).read_bytes() == (package / name).read_bytes(), name


def test_remote_code_pipeline_batches_mixed_sizes_without_scipy(tmp_path):
    """A Hub user (no align_detr_hf, no scipy): `pipeline(..., trust_remote_code=True)` runs our pipeline from the
    folder; a batch larger than the number of decoder layers, of images of different sizes, gives the installed
    package's one-image results."""
    from transformers import pipeline

    torch.manual_seed(0)
    AlignDetrForObjectDetection(tiny_config()).eval().save_pretrained(tmp_path / "model")
    AlignDetrImageProcessor(size=SIZE).save_pretrained(tmp_path / "model")
    rng = torch.Generator().manual_seed(2)
    images = [Image.fromarray(torch.randint(0, 256, size, dtype=torch.uint8, generator=rng).numpy())
              for size in [(60, 80, 3), (90, 50, 3), (60, 80, 3), (40, 40, 3)]]
    remote = run_without_package(tmp_path / "model", images, tmp_path, batch_size=3)  # 3 > 2 decoder layers
    local = pipeline("object-detection", model=str(tmp_path / "model"), image_processor=AlignDetrImageProcessor(
        size=SIZE))
    assert len(remote) == len(images)
    for image, got in zip(images, remote):
        expected = local(image, threshold=0.0)
        assert len(got) == len(expected) == 36
        assert [d["label"] for d in got] == [d["label"] for d in expected]
        assert [d["score"] for d in got] == pytest.approx([d["score"] for d in expected], abs=1e-5)


def test_trainer_checkpoint_and_final_folder_carry_the_code(trained):
    trainer, out, final = trained
    checkpoint = out / "checkpoint-2"
    for folder in (checkpoint, final):
        assert CODE_FILES <= {p.name for p in folder.glob("*.py")}, folder
        assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForObjectDetection"]
        assert "auto_map" in json.loads((folder / "preprocessor_config.json").read_text())
    # the checkpoint is the same model as the final save (2 steps, saved at step 2)
    assert (checkpoint / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()


def test_example_trainer_run_detects_in_a_process_without_the_package(tmp_path):
    """examples/train_trainer.py: a few steps with evaluation and a checkpoint; its final folder runs through
    `pipeline("object-detection")` in a process that cannot import align_detr_hf, with the same detections."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_train_trainer", EXAMPLES / "train_trainer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "run"
    torch.set_num_threads(1)
    metrics = script.main([*TINY, "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
                           "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps",
                           "--save_steps", "2", "--logging_steps", "1"])
    final = out / "final"
    for folder in (final, out / "checkpoint-2"):
        assert CODE_FILES <= {p.name for p in folder.glob("*.py")}, folder
        card = ModelCard.load(folder / "README.md")
        assert {r.metric_type: r.metric_value for r in card.data.eval_results}["map"] == round(metrics["eval_map"], 4)
        assert "| recipe |" in card.text
    rng = torch.Generator().manual_seed(1)
    images = [Image.fromarray(torch.randint(0, 256, size, dtype=torch.uint8, generator=rng).numpy())
              for size in [(60, 80, 3), (90, 50, 3)]]
    remote = run_without_package(final, images, tmp_path)

    from transformers import pipeline

    local = pipeline("object-detection", model=str(final))
    assert len(remote) == 2
    for image, got in zip(images, remote):
        expected = local(image, threshold=0.0)
        assert len(got) == len(expected) > 0
        assert [d["label"] for d in got] == [d["label"] for d in expected]
        assert [d["box"] for d in got] == [d["box"] for d in expected]
        assert [d["score"] for d in got] == pytest.approx([d["score"] for d in expected], abs=1e-5)


def test_trainer_card_in_checkpoint_final_and_push_folder(trained):
    trainer, out, final = trained
    for folder in (out / "checkpoint-2", final):
        card = ModelCard.load(folder / "README.md")
        assert card.data.base_model == "org/align-detr-r50"
        assert card.data.datasets == ["cppe-5"]
        results = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert results == FIXED_METRICS  # the last evaluation, through Trainer's "eval_" prefix
        assert card.data.model_name == "someone/align-detr-shapes"
        assert "| learning_rate | 0.0001 |" in card.text and "| backbone_lr_mult | 0.1 |" in card.text
        assert "| training_steps | 2 |" in card.text
        assert 'pipeline("object-detection", model="someone/align-detr-shapes", trust_remote_code=True)' in card.text
    # trainer.push_to_hub() writes the card through create_model_card: ours, not the generic Trainer card
    (out / "README.md").unlink(missing_ok=True)
    trainer.create_model_card(model_name="align-detr-shapes", finetuned_from="org/other-base", tasks="object-detection")
    card = ModelCard.load(out / "README.md")
    assert {r.metric_type for r in card.data.eval_results} == set(FIXED_METRICS)
    assert card.data.base_model == "org/other-base" and card.data.datasets == ["cppe-5"]
    assert card.data.pipeline_tag == "object-detection" and card.data.license == "apache-2.0"
    # a push from a checkpoint copies only weights and config into output_dir: the callback adds the code
    for name in CODE_FILES:
        (out / name).unlink(missing_ok=True)
    trainer.callback_handler.on_push_begin(trainer.args, trainer.state, trainer.control)
    assert CODE_FILES <= {p.name for p in out.glob("*.py")}


def test_model_card_metadata_round_trip(tmp_path):
    metrics = {"eval_map": 0.41234, "eval_map_50": 0.6, "eval_map_small": -1.0, "eval_loss": 3.2,
               "eval_runtime": 1.0, "mar_100": 0.55}
    written = write_model_card(
        tmp_path, model_name="org/align-detr-cppe5", base_model="org/align-detr-r50", datasets=["cppe-5"],
        metrics=metrics, dataset_name="CPPE-5", hyperparameters={"learning_rate": 1e-4, "batch_size": 16},
        source="https://example.org/ckpt.pth", license="mit", description="Fine-tuned on CPPE-5.",
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.to_dict() == written.data.to_dict()
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert card.data.base_model == "org/align-detr-r50" and card.data.datasets == ["cppe-5"]
    assert card.data.pipeline_tag == "object-detection" and "align-detr" in card.data.tags
    # model-index: COCO metrics only (no loss/runtime), pycocotools' -1 left out, Trainer prefix dropped
    results = card.data.eval_results
    assert [(r.metric_type, r.metric_value) for r in results] == [("map", 0.4123), ("map_50", 0.6), ("mar_100", 0.55)]
    assert {(r.task_type, r.dataset_type, r.dataset_name) for r in results} == {
        ("object-detection", "cppe-5", "CPPE-5")}
    assert card.data.model_name == "org/align-detr-cppe5"
    text = card.text
    assert "Fine-tuned on CPPE-5." in text and "https://example.org/ckpt.pth" in text
    assert "| AP @ IoU 0.50:0.95 (`map`) | 0.4123 |" in text and "| batch_size | 16 |" in text
    assert "arXiv:2304.07527" in text and 'model="org/align-detr-cppe5"' in text
    assert not list(tmp_path.glob(".README*"))  # the temporary file was renamed into place


def test_model_card_keeps_local_paths_out_of_metadata(tmp_path):
    card = build_model_card(base_model=str(tmp_path), datasets=[str(tmp_path / "coco")], model_name=None)
    assert card.data.base_model is None and card.data.datasets is None and card.data.eval_results is None
    assert str(tmp_path) in card.text  # still named in the text
    assert 'model="path/to/this/folder"' in card.text


def test_write_model_card_labels_from_the_folder_and_rejects_a_file(tmp_path):
    AlignDetrForObjectDetection(tiny_config()).save_pretrained(tmp_path)
    card = write_model_card(tmp_path)
    assert "**Classes:** 3 (circle, square, triangle)" in card.text
    with pytest.raises(NotADirectoryError, match="needs a folder"):
        write_model_card(tmp_path / "config.json")


def test_model_push_to_hub_uploads_weights_code_and_our_card(tmp_path, monkeypatch):
    """`model.push_to_hub` (offline: the Hub client is replaced) uploads one folder with our card."""
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()}, repo_id=repo_id)
            return "commit"

    def no_card(repo_id, token=None):
        raise hub.EntryNotFoundError(f"{repo_id} has no README.md")

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub.ModelCard, "load", staticmethod(no_card))
    model = AlignDetrForObjectDetection(tiny_config())
    assert model.push_to_hub("org/tiny", tags=["demo"], dataset_name="shapes") == "commit"
    assert uploaded["repo_id"] == "org/tiny"
    model_code = CODE_FILES - {"image_processing_align_detr.py"}  # the processor is pushed on its own
    assert {"model.safetensors", "config.json", "README.md"} | model_code <= set(uploaded)
    card = ModelCard(uploaded["README.md"].decode())
    assert "demo" in card.data.tags and card.data.license == "apache-2.0"
    assert 'model="org/tiny"' in card.text

    # a card already in the repository is kept (tags added), transformers' placeholder is replaced by ours
    placeholder = "---\nlibrary_name: transformers\n---\nThis model card has been automatically generated.\n"
    for existing, ours in [("---\nlicense: mit\n---\n# A hand-written card\n", False), (placeholder, True)]:
        monkeypatch.setattr(hub.ModelCard, "load", staticmethod(lambda repo_id, token=None: ModelCard(existing)))
        model.push_to_hub("org/tiny", tags=["demo"])
        card = ModelCard(uploaded["README.md"].decode())
        assert ("arXiv:2304.07527" in card.text) is ours and "demo" in card.data.tags
        assert card.data.license == ("apache-2.0" if ours else "mit")


def test_saving_remote_code_is_kept_for_backwards_compatibility(tmp_path):
    from align_detr_hf.convert_align_detr import saving_remote_code

    with saving_remote_code():
        AlignDetrImageProcessor().save_pretrained(tmp_path)
    assert (tmp_path / "image_processing_align_detr.py").is_file()
    assert AlignDetrImageProcessor._auto_class == "AutoImageProcessor"  # registration stays on afterwards


def test_model_card_describes_the_saved_network_and_loss(tmp_path):
    """The card's architecture sentence comes from the folder's config: a DINO-loss Swin 5-level model says so."""
    config = tiny_config(loss_type="dino", num_feature_levels=5, backbone_config={
        "model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4,
        "out_features": ["stage1", "stage2", "stage3", "stage4"]})
    AlignDetrForObjectDetection(config).save_pretrained(tmp_path / "swin")
    text = write_model_card(tmp_path / "swin").text
    assert "DINO-5scale" in text and "Swin Transformer backbone" in text and "DINO's loss" in text
    assert "Align-DETR loss" not in text
    AlignDetrForObjectDetection(tiny_config()).save_pretrained(tmp_path / "resnet")
    text = write_model_card(tmp_path / "resnet").text
    assert "ResNet backbone" in text and "the Align-DETR loss" in text
