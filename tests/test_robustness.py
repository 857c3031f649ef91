"""Malformed input by category, table-driven (issue 15): every public entry point ends in a clear error naming the
problem, or in a correct result. Never NaN, never a hang (each case runs under an alarm), never a file deleted or
half-written (the case's folder is snapshotted before and after).

A case is a function that sets up files in `ctx.root` and returns the action to run; `@case(category, expectation)`
registers it. Expectations:
- `Err(type, pattern)`: the action raises `type` whose message matches `pattern`; nothing in `ctx.root` changed.
- `Exit(pattern)`: a command (`main([...])`) exits with code 2 and prints one line to stderr that matches `pattern`,
  no traceback; nothing in `ctx.root` changed.
- `Ok(check)`: the action returns; `check(result, ctx)` asserts the result is right. Files that existed before are
  unchanged unless listed in `replaced`, and no temporary or staging file is left behind.
`CASES` (the table) is what `python tests/test_robustness.py` summarises by category.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import signal
import sys
import tempfile
import urllib.error
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

from align_detr_hf import AlignDetrForObjectDetection, AlignDetrImageProcessor  # noqa: E402
from align_detr_hf.cli import main as cli_main  # noqa: E402

CASE_TIME_LIMIT_S = 45
SIZE = {"shortest_edge": 64, "longest_edge": 96}  # small processing size: fast model forwards

# ------------------------------------------------------------------------------------------------ the machinery


@dataclass
class Err:
    type: type
    pattern: str


@dataclass
class Exit:
    pattern: str
    code: int = 2


@dataclass
class Ok:
    check: Callable[[Any, Any], None] | None = None
    replaced: tuple[str, ...] = ()  # files (relative to ctx.root) the action may rewrite


@dataclass
class Case:
    category: str
    name: str
    setup: Callable
    expect: Err | Exit | Ok


CASES: list[Case] = []


def case(category: str, expect):
    def register(setup):
        CASES.append(Case(category, setup.__name__, setup, expect))
        return setup

    return register


@contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (a hang becomes a failure, not a stuck suite)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"no result within {seconds} s (a hang?)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` (folders as '<dir>')."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


PROGRESS_BAR = re.compile(r"\d+%\|")
LEFTOVER = re.compile(r"(^|/)\.[^/]*(\.staging-|\.old-|\.tmp$)")


@dataclass
class Ctx:
    root: Path
    monkeypatch: Any
    capsys: Any
    model_dir: Path
    extras: dict = field(default_factory=dict)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def file(self, rel: str, data: bytes | str = b"x") -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def image(self, rel: str, image: Image.Image, **save_kwargs) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **save_kwargs)
        return path

    def cli(self, *argv):
        return lambda: cli_main([str(a) for a in argv])


def run_case(c: Case, ctx: Ctx):
    action = c.setup(ctx)
    before = snapshot(ctx.root)
    expect = c.expect
    ctx.capsys.readouterr()
    with time_limit(CASE_TIME_LIMIT_S):
        if isinstance(expect, Err):
            with pytest.raises(expect.type, match=expect.pattern):
                action()
        elif isinstance(expect, Exit):
            with pytest.raises(SystemExit) as exit_info:
                action()
            err = ctx.capsys.readouterr().err
            assert exit_info.value.code == expect.code, err
            # one line, apart from transformers' progress bars ("Loading weights: 100%|...")
            lines = [line for line in err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
            assert len(lines) == 1 and "Traceback" not in err, err
            assert re.search(expect.pattern, lines[0]), lines[0]
        else:
            result = action()
    after = snapshot(ctx.root)
    if isinstance(expect, (Err, Exit)):
        assert after == before, f"files changed on error: {set(after.items()) ^ set(before.items())}"
        return
    changed = [p for p, digest in before.items() if after.get(p) != digest and p not in expect.replaced]
    assert not [p for p in changed if not any(p.startswith(r + "/") for r in expect.replaced)], changed
    assert not [p for p in after if LEFTOVER.search(p)], [p for p in after if LEFTOVER.search(p)]
    if expect.check is not None:
        expect.check(result, ctx)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_model")
    AlignDetrForObjectDetection(tiny_config()).save_pretrained(folder)
    AlignDetrImageProcessor(size=SIZE).save_pretrained(folder)
    return folder


@pytest.fixture
def ctx(tmp_path, monkeypatch, capsys, model_dir):
    root = tmp_path / "ws"
    root.mkdir()
    monkeypatch.chdir(root)
    return Ctx(root, monkeypatch, capsys, model_dir)


def _rgb(height=24, width=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _tiny_model():
    torch.manual_seed(0)
    return AlignDetrForObjectDetection(tiny_config()).eval()


# ------------------------------------------------------------------------------------------------ converter output
# The conversion itself is replaced by a tiny model (the folder handling is what is tested; tests/test_convert.py
# converts the real fixture checkpoint).


def _fake_conversion(ctx):
    import align_detr_hf.convert_align_detr as convert

    ctx.monkeypatch.setattr(convert, "load_checkpoint_and_meta", lambda path, allow_pickle=False: ({}, {}))
    ctx.monkeypatch.setattr(convert, "config_from_state_dict", lambda state_dict, **kwargs: tiny_config())
    ctx.monkeypatch.setattr(convert, "load_converted", lambda state_dict, config=None: _tiny_model())


def _is_conversion(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names, names
    AlignDetrForObjectDetection.from_pretrained(folder)  # loads


def _previous_conversion(ctx, rel="out"):
    """A folder as `align-detr convert` leaves it (recorded in its manifest as the converter's)."""
    from align_detr_hf.convert_align_detr import WRITER
    from align_detr_hf.file_io import atomic_directory

    with atomic_directory(ctx.path(rel), WRITER) as staging:
        AlignDetrForObjectDetection(tiny_config(num_queries=7)).save_pretrained(staging)
        AlignDetrImageProcessor().save_pretrained(staging)
    return ctx.path(rel)


@case("converter_output", Exit(r"holds the input .*model\.pth"))
def convert_into_the_checkpoint_folder(ctx):
    _fake_conversion(ctx)
    checkpoint = ctx.file("ckpts/model.pth", b"PK weights")
    ctx.file("ckpts/notes.txt", "mine")
    return ctx.cli("convert", "--checkpoint", checkpoint, "--output-dir", ctx.path("ckpts"), "--overwrite_output_dir")


@case("converter_output", Exit(r"holds the input"))
def convert_into_a_parent_of_the_checkpoint(ctx):
    _fake_conversion(ctx)
    checkpoint = ctx.file("data/ckpts/model.pth", b"PK weights")
    return ctx.cli("convert", "--checkpoint", checkpoint, "--output-dir", ctx.path("data"), "--overwrite_output_dir")


@case("converter_output", Exit(r"current directory"))
def convert_into_the_current_directory(ctx):
    _fake_conversion(ctx)
    ctx.file("project/src.py", "print('mine')")
    ctx.monkeypatch.chdir(ctx.path("project"))
    return ctx.cli("convert", "--checkpoint", ctx.file("model.pth", b"PK"), "--output-dir", ".",
                   "--overwrite_output_dir")


@case("converter_output", Exit(r"refused to replace the folder .*photos: it holds cat\.jpg \(align-detr did not write "
                                r"it\); .*--overwrite"))
def convert_into_an_unrelated_folder(ctx):
    _fake_conversion(ctx)
    ctx.file("photos/cat.jpg", b"jpeg bytes")
    return ctx.cli("convert", "--checkpoint", ctx.file("model.pth", b"PK"), "--output-dir", ctx.path("photos"))


@case("converter_output", Exit(r"refused to replace the folder .*out: it holds my_notes\.txt"))
def convert_over_a_conversion_holding_a_user_file(ctx):
    _fake_conversion(ctx)
    _previous_conversion(ctx)
    ctx.file("out/my_notes.txt", "keep me")
    return ctx.cli("convert", "--checkpoint", ctx.file("model.pth", b"PK"), "--output-dir", ctx.path("out"))


@case("converter_output", Exit(r"out\.safetensors is a file"))
def convert_to_a_path_that_is_a_file(ctx):
    _fake_conversion(ctx)
    target = ctx.file("out.safetensors", b"not a folder")
    return ctx.cli("convert", "--checkpoint", ctx.file("model.pth", b"PK"), "--output-dir", target)


@case("converter_output", Exit(r"is a file, not a folder"))
def convert_below_a_file(ctx):
    _fake_conversion(ctx)
    ctx.file("a_file", b"x")
    return ctx.cli("convert", "--checkpoint", ctx.file("model.pth", b"PK"), "--output-dir", ctx.path("a_file/out"))


@case("converter_output", Exit(r"(Permission denied|not writable)"))
def convert_into_a_read_only_folder(ctx):
    _fake_conversion(ctx)
    ctx.path("readonly").mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(ctx.path("readonly")))

    ctx.monkeypatch.setattr(tempfile, "mkdtemp", refuse)  # as a read-only folder does, also for root
    return ctx.cli("convert", "--checkpoint", ctx.file("model.pth", b"PK"), "--output-dir", ctx.path("readonly/out"))


@case("converter_output", Exit(r"disk full"))
def convert_fails_while_writing_and_keeps_the_old_conversion(ctx):
    _fake_conversion(ctx)
    _previous_conversion(ctx)
    original = AlignDetrImageProcessor.save_pretrained

    def fail_half_way(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)
        raise OSError(28, "disk full")

    ctx.monkeypatch.setattr(AlignDetrImageProcessor, "save_pretrained", fail_half_way)
    return ctx.cli("convert", "--checkpoint", ctx.file("model.pth", b"PK"), "--output-dir", ctx.path("out"))


def _replaced_by_new_conversion(result, ctx):
    _is_conversion(ctx.path("out"))
    assert AlignDetrForObjectDetection.from_pretrained(ctx.path("out")).config.num_queries == 12  # the new one
    assert ctx.path("model.pth").read_bytes() == b"PK"


@case("converter_output", Ok(_replaced_by_new_conversion, replaced=("out",)))
def convert_over_a_previous_conversion(ctx):
    _fake_conversion(ctx)
    _previous_conversion(ctx)
    return ctx.cli("convert", "--checkpoint", ctx.file("model.pth", b"PK"), "--output-dir", ctx.path("out"))


def _written_with_overwrite(result, ctx):
    _is_conversion(ctx.path("out"))
    assert ctx.path("out/old.txt").read_text() == "old" and ctx.path("beside.txt").read_text() == "untouched"


@case("converter_output", Ok(_written_with_overwrite))  # --overwrite replaces what it writes, deletes nothing else
def convert_with_overwrite_writes_into_an_unrelated_folder_and_keeps_its_files(ctx):
    _fake_conversion(ctx)
    ctx.file("out/old.txt", "old")
    ctx.file("beside.txt", "untouched")
    return ctx.cli("convert", "--checkpoint", ctx.file("model.pth", b"PK"), "--output-dir", ctx.path("out"),
                   "--overwrite_output_dir")  # fmt: skip


@case("converter_output", Ok(lambda result, ctx: _is_conversion(ctx.path("new/deep/out"))))
def convert_into_a_new_nested_folder(ctx):
    _fake_conversion(ctx)
    return ctx.cli("convert", "--checkpoint", ctx.file("model.pth", b"PK"), "--output-dir", ctx.path("new/deep/out"))


@case("converter_output", Ok(lambda result, ctx: _is_conversion(ctx.path("empty"))))
def convert_into_an_empty_folder(ctx):
    _fake_conversion(ctx)
    ctx.path("empty").mkdir()
    return ctx.cli("convert", "--checkpoint", ctx.file("model.pth", b"PK"), "--output-dir", ctx.path("empty"))


# ------------------------------------------------------------------------------------------------ checkpoint files


def _load(path):
    from align_detr_hf.convert_align_detr import load_checkpoint

    return lambda: load_checkpoint(path)


@case("checkpoint_file", Err(ValueError, r"empty \(0 bytes\)"))
def empty_checkpoint(ctx):
    return _load(ctx.file("empty.pth", b""))


@case("checkpoint_file", Err(ValueError, r"is text, not a torch checkpoint .*'version https://git-lfs"))
def text_checkpoint(ctx):  # a Git LFS pointer instead of the weights
    return _load(ctx.file("lfs.pth", "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n"))


@case("checkpoint_file", Err(ValueError, r"is HTML \(an error page"))
def html_checkpoint(ctx):
    return _load(ctx.file("page.pth", "<!DOCTYPE html><html><body>404</body></html>"))


@case("checkpoint_file", Exit(r"error: .*is text, not a torch checkpoint"))
def text_checkpoint_on_the_command_line(ctx):
    return ctx.cli("convert", "--checkpoint", ctx.file("notes.pth", "hello\n"), "--output-dir", ctx.path("out"))


@case("checkpoint_file", Err(ValueError, r"Could not read .*random\.pth as a torch checkpoint"))
def random_bytes_checkpoint(ctx):
    return _load(ctx.file("random.pth", bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))))


@case("checkpoint_file", Err(ValueError, r"every key starts with 'module\.' .*DistributedDataParallel.*removeprefix"))
def ddp_prefixed_checkpoint(ctx):
    path = ctx.path("ddp.pth")
    torch.save({"state_dict": {"module.backbone.conv1.weight": torch.zeros(2), "module.level_embed": torch.zeros(2)}},
               path)  # fmt: skip
    return _load(path)


@case("checkpoint_file", Err(ValueError, r"holds no state dict of tensors"))
def checkpoint_without_tensors(ctx):
    path = ctx.path("list.pth")
    torch.save([1, 2, 3], path)
    return _load(path)


@case("checkpoint_file", Err(FileNotFoundError, r"No checkpoint at .*missing\.pth"))
def missing_checkpoint(ctx):
    return _load(ctx.path("missing.pth"))


@case("checkpoint_file", Exit(r"cannot download http://127\.0\.0\.1:9/align_detr_robustness_test\.pth"))
def unreachable_checkpoint_url(ctx):  # port 9 (discard) on localhost: refused at once, no network needed
    return ctx.cli("convert", "--checkpoint", "http://127.0.0.1:9/align_detr_robustness_test.pth",
                   "--output-dir", ctx.path("out"))  # fmt: skip


@case("checkpoint_file", Exit(r"cannot download https://example\.invalid/x_robustness\.pth: .*Name or service"))
def checkpoint_url_dns_failure(ctx):
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    ctx.monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    return ctx.cli("convert", "--checkpoint", "https://example.invalid/x_robustness.pth", "--output-dir",
                   ctx.path("out"))  # fmt: skip


# ------------------------------------------------------------------------------------------------ predict command


def _predict(ctx, *images, extra=()):
    return ctx.cli("predict", *images, "--model", ctx.model_dir, "--output_dir", ctx.path("pred"), "--top-k", "5",
                   "--threshold", "0", *extra)  # fmt: skip


def _processor_detections(ctx, image: Image.Image):
    processor = AlignDetrImageProcessor.from_pretrained(ctx.model_dir)
    model = AlignDetrForObjectDetection.from_pretrained(ctx.model_dir).eval()
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    result = processor.post_process_object_detection(outputs, target_sizes=[(image.height, image.width)], top_k=5)[0]
    return [round(float(s), 5) for s in result["scores"]], result["boxes"]


def _same_as_processor(reference: Callable[[Ctx], Image.Image]):
    def check(result, ctx):
        (entry,) = json.loads(ctx.path("pred/detections.json").read_text())["images"]
        image = reference(ctx)
        assert (entry["width"], entry["height"]) == image.size
        scores, boxes = _processor_detections(ctx, image)
        assert [d["score"] for d in entry["detections"]] == scores
        assert torch.allclose(torch.tensor([d["box"] for d in entry["detections"]]), boxes, atol=0.01)

    return check


def _gradient16() -> np.ndarray:
    yy, xx = np.mgrid[0:48, 0:64]
    return (xx * 1000 + yy * 20).astype(np.uint16)  # 0..63940: most pixels above 255


@case("predict", Ok(_same_as_processor(lambda ctx: Image.fromarray(_gradient16()))))
def predict_16_bit_png(ctx):
    path = ctx.image("gray16.png", Image.fromarray(_gradient16()))
    with Image.open(path) as image:
        assert image.mode == "I;16"
    return _predict(ctx, path)


def _exif_jpeg(ctx, rel, orientation=6):
    """A 40x24 (w x h) JPEG stored landscape with a red block at its top-left, EXIF orientation `orientation`."""
    pixels = np.full((24, 40, 3), 255, np.uint8)
    pixels[:8, :12] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return ctx.image(rel, Image.fromarray(pixels), exif=exif.tobytes(), quality=95)


def _displayed(ctx) -> Image.Image:  # orientation 6 = rotate 90 degrees clockwise to display
    displayed = Image.open(ctx.path("rotated.jpg")).transpose(Image.Transpose.ROTATE_270)
    assert displayed.size == (24, 40)
    return displayed


@case("predict", Ok(_same_as_processor(_displayed)))
def predict_jpeg_with_exif_orientation(ctx):
    return _predict(ctx, _exif_jpeg(ctx, "rotated.jpg"))


@case("predict", Exit(r"--output_dir .*out_file: .*is a file, not a folder"))
def predict_output_is_a_file(ctx):
    return _predict(ctx, ctx.image("a.png", Image.fromarray(_rgb())), extra=("--output_dir", ctx.file("out_file")))


@case("predict", Exit(r"(Permission denied|not writable)"))
def predict_output_read_only(ctx):
    image = ctx.image("a.png", Image.fromarray(_rgb()))
    ctx.path("pred").mkdir()
    real_access = os.access
    ctx.monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == ctx.path("pred")
                            else real_access(p, mode, *a, **k))  # fmt: skip
    return _predict(ctx, image)


@case("predict", Exit(r"cannot read image .*bomb\.png: Image size \(\d+ pixels\) exceeds limit .*MAX_IMAGE_PIXELS"))
def predict_decompression_bomb(ctx):
    path = ctx.image("bomb.png", Image.new("L", (200, 200)))
    ctx.monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 000 px > 2 x the limit: Pillow's bomb error
    return _predict(ctx, path)


@case("predict", Exit(r"cannot download image http://127\.0\.0\.1:9/x\.png"))
def predict_unreachable_url(ctx):
    return _predict(ctx, "http://127.0.0.1:9/x.png")


@case("predict", Exit(r"cannot read image .*notes\.png: not an image format"))
def predict_text_file(ctx):
    return _predict(ctx, ctx.file("notes.png", "hello"))


@case("predict", Exit(r"cannot read image .*cut\.png"))
def predict_truncated_png(ctx):
    buffer = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buffer, format="PNG")
    return _predict(ctx, ctx.file("cut.png", buffer.getvalue()[:200]))


@case("predict", Exit(r"image not found: .*nope\.png"))
def predict_missing_image(ctx):
    return _predict(ctx, ctx.path("nope.png"))


@case("predict", Exit(r"not a file: .*a_folder"))
def predict_folder_as_image(ctx):
    ctx.path("a_folder").mkdir()
    return _predict(ctx, ctx.path("a_folder"))


def _outputs_written_beside_user_files(result, ctx):
    assert ctx.path("pred/mine.txt").read_text() == "user file"
    assert (ctx.path("pred") / "a_detections.png").is_file() and ctx.path("pred/detections.json").is_file()


@case("predict", Ok(_outputs_written_beside_user_files, replaced=("pred/detections.json", "pred/.align_detr_manifest.json")))
def predict_into_a_folder_with_other_files(ctx):
    from align_detr_hf.cli import PREDICT_WRITER
    from align_detr_hf.file_io import record_output

    image = ctx.image("a.png", Image.fromarray(_rgb()))
    ctx.file("pred/mine.txt", "user file")
    record_output(ctx.file("pred/detections.json", "{}"), PREDICT_WRITER)  # an earlier predict's: replaced atomically
    return _predict(ctx, image)


@case("predict", Exit(r"refused to replace .*pred/detections\.json: align-detr did not write it; .*--overwrite"))
def predict_over_a_users_file_of_the_same_name(ctx):
    image = ctx.image("a.png", Image.fromarray(_rgb()))
    ctx.file("pred/detections.json", '{"mine": true}')
    return _predict(ctx, image)


# ------------------------------------------------------------------------------------------------ demo command


def _demo(ctx, *extra):
    return ctx.cli("demo", "--output_dir", ctx.path("demo"), "--quiet", *extra)


_IMPOSSIBLE_DEMO_ARGS = {
    "no_train_images": (("--num_train_images", "0"), r"--num_train_images must be at least 1, got 0"),
    "no_val_images": (("--num_val_images", "0"), r"--num_val_images must be at least 1, got 0"),
    "batch_size_0": (("--per_device_train_batch_size", "0"),
                     r"--per_device_train_batch_size must be at least 1, got 0"),
    "d_model_not_multiple_of_32": (("--d_model", "48"), r"--d_model must be a positive multiple of 32 .*GroupNorm"),
    "d_model_negative": (("--d_model", "-32"), r"--d_model must be a positive multiple of 32"),
    "d_model_32_small_images": (("--d_model", "32", "--image_size", "64"),
                                r"--d_model 32 needs --image_size of at least 128 \(got 64\)"),
    "negative_steps": (("--max_steps", "-1"), r"--max_steps must be at least 1"),
    "tiny_images": (("--image_size", "32"), r"--image_size must be at least 64, got 32"),
    "zero_lr": (("--learning_rate", "0"), r"--learning_rate must be a positive number"),
    "nan_lr": (("--learning_rate", "nan"), r"--learning_rate must be a positive number"),
    "no_time_budget": (("--time_budget_s", "0"), r"--time_budget_s must be positive"),
    "threshold_above_1": (("--score_threshold", "2"), r"--score_threshold must be between 0 and 1"),
}
CASES += [
    Case("demo", f"demo_{name}", (lambda a: lambda ctx: _demo(ctx, *a))(args), Exit(pattern))
    for name, (args, pattern) in _IMPOSSIBLE_DEMO_ARGS.items()
]


@case("demo", Exit(r"--output_dir .*taken: .*is a file, not a folder"))
def demo_output_is_a_file(ctx):
    return ctx.cli("demo", "--output_dir", ctx.file("taken"), "--quiet")


@case("demo", Exit(r"refused to replace the folder .*demo/model: it holds thesis\.tex"))
def demo_model_folder_holds_user_files(ctx):
    ctx.file("demo/model/thesis.tex", "keep me")
    return _demo(ctx)


def _demo_trained(result, ctx):
    metrics = json.loads(ctx.path("demo/metrics.json").read_text())
    assert metrics["steps"] == 3 and all(math.isfinite(v) for v in metrics["metrics"].values())
    _is_conversion(ctx.path("demo/model"))


@case("demo", Ok(_demo_trained))
def demo_fewer_images_than_one_batch_ends(ctx):
    """4 training images, batch size 8: the loader used to drop its only (short) batch and the loop never ended."""
    return _demo(ctx, "--num_train_images", "4", "--per_device_train_batch_size", "8", "--max_steps", "3",
                 "--num_val_images", "2",
                 "--image_size", "64", "--d_model", "64", "--num_queries", "5", "--threads", "1")  # fmt: skip


# ------------------------------------------------------------------------------------------------ image processor


def _processor(**kwargs):
    return AlignDetrImageProcessor(size={"shortest_edge": 16, "longest_edge": 32}, **kwargs)


@case("processor", Err(TypeError, r"'do_normalise' \(did you mean 'do_normalize'\?\)"))
def processor_typo_in_constructor(ctx):
    return lambda: AlignDetrImageProcessor(do_normalise=False)


@case("processor", Err(ValueError, r"'do_rezise' \(did you mean 'do_resize'\?\)"))
def processor_typo_in_call(ctx):
    return lambda: _processor()(_rgb(), do_rezise=False)


def _loaded_config_is_right(result, ctx):
    assert result.do_normalize is False and result.size == {"shortest_edge": 320, "longest_edge": 512}
    assert result.to_dict()["image_processor_type"] == "AlignDetrImageProcessor"


@case("processor", Ok(_loaded_config_is_right))
def processor_loads_configs_with_transformers_keys(ctx):
    config = {"do_normalize": False, "size": {"shortest_edge": 320, "longest_edge": 512},
              "image_processor_type": "AlignDetrImageProcessor", "processor_class": "AlignDetrProcessor",
              "auto_map": {"AutoImageProcessor": "image_processing_align_detr.AlignDetrImageProcessor"}}  # fmt: skip
    return lambda: AlignDetrImageProcessor.from_dict(config)


@case("processor", Ok(lambda result, ctx: _loaded_config_is_right(result, ctx)))
def processor_save_and_from_pretrained_round_trip(ctx):
    AlignDetrImageProcessor(do_normalize=False, size={"shortest_edge": 320, "longest_edge": 512}).save_pretrained(
        ctx.path("proc"))
    return lambda: AlignDetrImageProcessor.from_pretrained(ctx.path("proc"))


@case("processor", Ok(lambda result, ctx: _check_equal(result, _processor()(Image.fromarray(_rgb(4, 6)),
                                                                           do_resize=False))))
def processor_torch_hwc_with_input_data_format(ctx):
    image = torch.from_numpy(_rgb(4, 6))  # (4, 6, 3): 4 could be RGBA channels
    return lambda: _processor()(image, input_data_format="channels_last", do_resize=False)


@case("processor", Err(ValueError, r"Ambiguous image shape \(4, 6, 3\).*input_data_format"))
def processor_ambiguous_torch_hwc(ctx):
    return lambda: _processor()(torch.from_numpy(_rgb(4, 6)))


@case("processor", Err(ValueError, r"Ambiguous image shape \(3, 5, 3\)"))
def processor_ambiguous_numpy(ctx):
    return lambda: _processor()(_rgb(3, 5))


@case("processor", Ok(lambda result, ctx: _check_equal(result, _processor()(_rgb(8, 10), do_resize=False))))
def processor_unambiguous_torch_hwc(ctx):
    return lambda: _processor()(torch.from_numpy(_rgb(8, 10)), do_resize=False)


@case("processor", Err(ValueError, r"no 1, 3 or 4 channels on the first axis .*channels_first"))
def processor_input_data_format_contradicts_shape(ctx):
    return lambda: _processor()(_rgb(8, 10), input_data_format="channels_first")


@case("processor", Err(ValueError, r"input_data_format must be 'channels_first' or 'channels_last', got 'hwc'"))
def processor_bad_input_data_format(ctx):
    return lambda: _processor()(_rgb(8, 10), input_data_format="hwc")


def _check_equal(result, expected):
    assert torch.equal(result["pixel_values"], expected["pixel_values"])


@case("processor", Ok(lambda result, ctx: _check_equal(result, _processor()(Image.fromarray(_gradient16())))))
def processor_mode_i_reads_as_16_bit(ctx):  # the mode older Pillow gives 16-bit PNGs
    return lambda: _processor()(Image.fromarray(_gradient16().astype(np.int32)))


@case("processor", Err(ValueError, r"PIL mode 'I' image with values in \[-5, 70000\]"))
def processor_mode_i_out_of_16_bit_range(ctx):
    values = np.zeros((8, 8), np.int32)
    values[0, 0], values[0, 1] = -5, 70000
    return lambda: _processor()(Image.fromarray(values))


@case("processor", Err(ValueError, r"Float image contains NaN or infinite values"))
def processor_nan_image(ctx):
    image = np.zeros((8, 8, 3), np.float32)
    image[1, 1, 1] = np.nan
    return lambda: _processor()(image)


@case("processor", Err(FileNotFoundError, r"image not found: cat.jpg"))
def processor_missing_image_path(ctx):  # paths are read (as `align-detr predict` reads them)
    return lambda: _processor()("cat.jpg")


# ------------------------------------------------------------------------------------------------ post-processing


def _outputs(batch=2, dtype=torch.float32, boxes=None):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, 6, 3, generator=generator)
    pred_boxes = torch.rand(batch, 6, 4, generator=generator) * 0.5 + 0.25 if boxes is None else boxes
    return {"logits": logits.to(dtype), "pred_boxes": pred_boxes.to(dtype)}


def _post(outputs, **kwargs):
    return lambda: AlignDetrImageProcessor().post_process_object_detection(outputs, **kwargs)


@case("post_processing", Err(ValueError, r"target_sizes must have shape \(2, 2\), got \(2,\)"))
def post_flat_target_sizes_tensor(ctx):
    return _post(_outputs(), target_sizes=torch.tensor([480, 640]))


@case("post_processing", Err(ValueError, r"target_sizes must have shape \(2, 2\), got \(2, 3\)"))
def post_target_sizes_with_three_numbers(ctx):
    return _post(_outputs(), target_sizes=torch.ones(2, 3))


@case("post_processing", Err(ValueError, r"target_sizes\[0\] must be a \(height, width\) pair, got 480"))
def post_flat_target_sizes_list(ctx):
    return _post(_outputs(), target_sizes=[480, 640])


@case("post_processing", Err(ValueError, r"target_sizes has 1 entries but the outputs hold 2 images"))
def post_too_few_target_sizes(ctx):
    return _post(_outputs(), target_sizes=[(480, 640)])


@case("post_processing", Err(ValueError, r"target_sizes\[0\] must be positive finite \(height, width\)"))
def post_negative_target_size(ctx):
    return _post(_outputs(), target_sizes=[(-480, 640), (480, 640)])


@case("post_processing", Err(ValueError, r"non-finite .*image\(s\) \[1\]"))
def post_nan_outputs(ctx):
    outputs = _outputs()
    outputs["logits"][1, 2, 0] = float("nan")
    return _post(outputs)


def _matches_float32(dtype):
    def check(result, ctx):
        outputs = _outputs(dtype=dtype)
        reference = AlignDetrImageProcessor().post_process_object_detection(
            {k: v.float() for k, v in outputs.items()}, target_sizes=[(5000, 5000)] * 2)
        for ours, ref in zip(result, reference):
            assert ours["boxes"].dtype == torch.float32
            assert torch.allclose(ours["boxes"], ref["boxes"], atol=1e-3)  # bf16 arithmetic was 16 px off
            assert torch.allclose(ours["scores"], ref["scores"])

    return check


@case("post_processing", Ok(_matches_float32(torch.bfloat16)))
def post_bfloat16_outputs_in_float32(ctx):
    return _post(_outputs(dtype=torch.bfloat16), target_sizes=[(5000, 5000)] * 2)


@case("post_processing", Ok(_matches_float32(torch.float16)))
def post_float16_outputs_in_float32(ctx):
    return _post(_outputs(dtype=torch.float16), target_sizes=[(5000, 5000)] * 2)


@case("post_processing", Err(ValueError, r"Expected logits \(B, Q, C\) and pred_boxes \(B, Q, 4\)"))
def post_boxes_of_another_batch(ctx):
    return _post({"logits": torch.zeros(2, 6, 3), "pred_boxes": torch.zeros(1, 6, 4)})


# ------------------------------------------------------------------------------------------------ evaluation

GT = {
    "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 100, "height": 80}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 0, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 40, 20, 30], "area": 600, "iscrowd": 0},
    ],
    "categories": [{"id": 0, "name": "circle"}, {"id": 1, "name": "square"}, {"id": 2, "name": "triangle"}],
}
PERFECT = [
    {"scores": [0.9], "labels": [0], "boxes": [[10.0, 10.0, 40.0, 30.0]]},
    {"scores": [0.8], "labels": [2], "boxes": [[50.0, 40.0, 70.0, 70.0]]},
]


def _evaluate(detections, image_ids=(1, 2), gt=GT, **kwargs):
    from align_detr_hf.evaluation import CocoEvaluator

    def run():
        evaluator = CocoEvaluator(json.loads(json.dumps(gt)), **kwargs)
        evaluator.update(list(image_ids), detections)
        return evaluator.compute()

    return run


def _with(index, **changes):
    detections = json.loads(json.dumps(PERFECT))
    detections[index].update(changes)
    return detections


@case("evaluation", Ok(lambda result, ctx: pytest.approx(1.0) == result["map"]))
def eval_perfect_predictions(ctx):
    return _evaluate(PERFECT)


@case("evaluation", Err(ValueError, r"image_id 2: NaN/inf in the scores or boxes"))
def eval_nan_score(ctx):
    return _evaluate(_with(1, scores=[float("nan")]))


@case("evaluation", Err(ValueError, r"image_id 1: NaN/inf in the scores or boxes"))
def eval_nan_box(ctx):
    return _evaluate(_with(0, boxes=[[10.0, float("nan"), 40.0, 30.0]]))


@case("evaluation", Err(ValueError, r"image_id 1: label\(s\) \[90\] are not category ids of the ground truth \(0\.\.2, 3 ids\)\. Are the "
                   r"predictions in the original dataset's category ids"))
def eval_original_coco_ids_against_contiguous(ctx):
    return _evaluate([{"scores": [0.9, 0.5], "labels": [1, 90], "boxes": [[10, 10, 40, 30]] * 2},
                      {"scores": [0.8], "labels": [3], "boxes": [[50, 40, 70, 70]]}])  # fmt: skip


@case("evaluation", Err(ValueError, r"label\(s\) \[0\] are not category ids of the ground truth \(1\.\.90"))
def eval_contiguous_labels_against_coco_ids(ctx):
    gt = json.loads(json.dumps(GT))
    gt["categories"] = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 90, "name": "toothbrush"}]
    for ann, cat in zip(gt["annotations"], (1, 90)):
        ann["category_id"] = cat
    return _evaluate(PERFECT, gt=gt)


@case("evaluation", Ok(lambda result, ctx: pytest.approx(1.0) == result["map"]))
def eval_extra_model_classes_ignored_on_request(ctx):
    detections = _with(0, scores=[0.9, 0.95], labels=[0, 7], boxes=[[10.0, 10.0, 40.0, 30.0], [0, 0, 5, 5]])
    return _evaluate(detections, unknown_labels="ignore")


@case("evaluation", Err(ValueError, r"image_id 5 is not in the ground truth"))
def eval_unknown_image_id(ctx):
    return _evaluate(PERFECT, image_ids=(1, 5))


@case("evaluation", Err(ValueError, r"the ground truth: images\[1\] \(id 1\): id 1 is already used by images\[0\]"))
def eval_duplicate_image_ids_in_ground_truth(ctx):
    gt = json.loads(json.dumps(GT))
    gt["images"][1]["id"] = 1
    return _evaluate(PERFECT, gt=gt)


@case("evaluation", Err(ValueError, r"2 image ids for 1 detection dicts"))
def eval_fewer_detections_than_images(ctx):
    return _evaluate(PERFECT[:1])


@case("evaluation", Err(ValueError, r"1 scores, 2 labels and 1 boxes"))
def eval_ragged_detections(ctx):
    return _evaluate(_with(0, labels=[0, 1]))


# ------------------------------------------------------------------------------------------------ data loading


def _coco_folder(ctx, images, annotations=()):
    """`train/annotations.json` listing `images` = [(file_name, json width, json height)] (files in train/images/)."""
    entries = [{"id": i + 1, "file_name": name, "width": w, "height": h} for i, (name, w, h) in enumerate(images)]
    coco = {"images": entries, "annotations": list(annotations), "categories": [{"id": 1, "name": "thing"}]}
    return ctx.file("train/annotations.json", json.dumps(coco))


def _load_folder(path):
    from align_detr_hf.data import load_coco_folder

    return lambda: load_coco_folder(path)


@case("data_loading", Err(ValueError, r"a\.png is 32x24, the json says 30x24"))
def data_json_size_disagrees_with_file(ctx):
    ctx.image("train/images/a.png", Image.fromarray(_rgb()))
    return _load_folder(_coco_folder(ctx, [("a.png", 30, 24)]))


@case("data_loading", Err(ValueError, r"annotations\.json: images\[1\] \(id 1\): id 1 is already used by images\[0\]"))
def data_duplicate_image_ids(ctx):
    for name in ("a.png", "b.png"):
        ctx.image(f"train/images/{name}", Image.fromarray(_rgb()))
    path = _coco_folder(ctx, [("a.png", 32, 24), ("b.png", 32, 24)])
    coco = json.loads(path.read_text())
    coco["images"][1]["id"] = 1
    path.write_text(json.dumps(coco))
    return _load_folder(path)


@case("data_loading", Err(ValueError, r"json says 40x24 \(the json gives the stored size; the EXIF orientation"))
def data_json_gives_stored_size_of_rotated_jpeg(ctx):
    _exif_jpeg(ctx, "train/images/r.jpg")  # stored 40x24, displayed 24x40
    return _load_folder(_coco_folder(ctx, [("r.jpg", 40, 24)]))


def _rotated_item_lines_up(result, ctx):
    item = result[0]
    assert tuple(item["pixel_values"].shape) == (3, 40, 24)  # displayed: 24 wide, 40 high
    red = item["pixel_values"][0] > item["pixel_values"][2] + 2  # normalised red >> blue where the block is
    (x, y, w, h) = (16, 0, 8, 12)  # the block, stored at the top-left, displays at the top-right
    assert red[y : y + h, x : x + w].float().mean() > 0.9 and red.float().mean() < 0.15
    cx, cy, bw, bh = item["labels"]["boxes"][0].tolist()
    assert (cx, cy, bw, bh) == pytest.approx(((x + w / 2) / 24, (y + h / 2) / 40, w / 24, h / 40))


@case("data_loading", Ok(_rotated_item_lines_up))
def data_exif_rotated_jpeg_lines_up_with_displayed_boxes(ctx):
    path = _exif_jpeg(ctx, "train/images/r.jpg")
    annotation = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [16, 0, 8, 12], "area": 96, "iscrowd": 0}
    return _load_folder(_coco_folder(ctx, [("r.jpg", 24, 40)], [annotation]))


def _sixteen_bit_item(result, ctx):
    expected = AlignDetrImageProcessor(do_resize=False)(Image.fromarray(_gradient16()))["pixel_values"][0]
    assert torch.allclose(result[0]["pixel_values"], expected, atol=1e-4)
    assert result.load_image(0).mode == "RGB" and np.asarray(result.load_image(0)).max() == 249  # 63940 scaled, not clipped


@case("data_loading", Ok(_sixteen_bit_item))
def data_16_bit_png(ctx):
    ctx.image("train/images/g.png", Image.fromarray(_gradient16()))
    return _load_folder(_coco_folder(ctx, [("g.png", 64, 48)]))


@case("data_loading", Err(ValueError, r"cannot read image .*broken\.png"))
def data_image_that_is_not_an_image(ctx):
    ctx.file("train/images/broken.png", "not an image")
    return _load_folder(_coco_folder(ctx, [("broken.png", 10, 10)]))


# ------------------------------------------------------------------------------------------------ model forward


def _forward(train, *args, **kwargs):
    def run():
        model = _tiny_model().train(train)
        return model(*args, **kwargs)

    return run


for _train in (False, True):
    _mode = "train" if _train else "eval"
    CASES += [
        Case("model_forward", f"{_mode}_3d_pixel_values", (lambda t: lambda ctx: _forward(t, torch.zeros(3, 64, 64)))(
            _train), Err(ValueError, r"pixel_values must be \(batch, 3, height, width\), got \(3, 64, 64\)")),
        Case("model_forward", f"{_mode}_one_channel", (lambda t: lambda ctx: _forward(t, torch.zeros(1, 1, 64, 64)))(
            _train), Err(ValueError, r"pixel_values must be \(batch, 3, height, width\), got \(1, 1, 64, 64\)")),
        Case("model_forward", f"{_mode}_mask_of_another_size", (lambda t: lambda ctx: _forward(
            t, torch.zeros(1, 3, 64, 64), torch.ones(1, 32, 64, dtype=torch.long)))(_train),
            Err(ValueError, r"pixel_mask must be \(batch, height, width\) = \(1, 64, 64\)")),
        Case("model_forward", f"{_mode}_pixel_boxes_as_labels", (lambda t: lambda ctx: _forward(
            t, torch.zeros(1, 3, 64, 64), labels=[{"class_labels": torch.tensor([0]),
                                                   "boxes": torch.tensor([[32.0, 32.0, 10.0, 10.0]])}]))(_train),
            Err(ValueError, r"values outside \[0, 1\]: boxes must be cxcywh normalised")),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("c", CASES, ids=[f"{c.category}/{c.name}" for c in CASES])
def test_case(c, ctx):
    run_case(c, ctx)


def test_every_category_has_cases_of_both_kinds_where_it_can():
    counts = Counter((c.category, "ok" if isinstance(c.expect, Ok) else "error") for c in CASES)
    for category in ("converter_output", "predict", "processor", "post_processing", "evaluation", "data_loading"):
        assert counts[category, "ok"] > 0 and counts[category, "error"] > 0, category


def summary() -> str:
    """The table for the issue's closing note: category -> cases -> outcomes."""
    rows = Counter()
    for c in CASES:
        rows[c.category, "correct result" if isinstance(c.expect, Ok) else "clear error"] += 1
    lines = ["| category | cases | clear error | correct result |", "|---|---|---|---|"]
    for category in dict.fromkeys(c.category for c in CASES):
        err, ok = rows[category, "clear error"], rows[category, "correct result"]
        lines.append(f"| {category} | {err + ok} | {err} | {ok} |")
    lines.append(f"| **all** | {len(CASES)} | {sum(v for (_, k), v in rows.items() if k == 'clear error')} | "
                 f"{sum(v for (_, k), v in rows.items() if k == 'correct result')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary())


# ------------------------------------------------------------------------------------------------ properties


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_for_real(tmp_path, capsys):
    folder = tmp_path / "readonly"
    folder.mkdir()
    image = tmp_path / "a.png"
    Image.fromarray(_rgb()).save(image)
    folder.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["convert", "--checkpoint", str(image), "--output-dir", str(folder / "out")])
        assert exit_info.value.code == 2 and "permission denied" in capsys.readouterr().err.lower()
        with pytest.raises(SystemExit):
            cli_main(["predict", str(image), "--model", str(tmp_path), "--output_dir", str(folder)])
        assert "not writable" in capsys.readouterr().err
    finally:
        folder.chmod(0o700)
    assert list(folder.iterdir()) == []


def test_atomic_directory_property(tmp_path):
    """Random existing folders (ours, ours but edited, or a user's) x overwrite x outcome: a refused or failed write
    leaves every byte as it was; a successful one leaves the new content and never deletes or changes a file the
    writer does not own (unless overwrite asked for the same name); nothing beside the folder changes, no staging is
    left."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from align_detr_hf.file_io import OutputPathError, atomic_directory, record_output

    names = st.sampled_from(["config.json", "model.safetensors", "notes.txt", "sub/x.bin", "a.py"])

    @settings(max_examples=40, deadline=None, database=None)
    @given(existing=st.one_of(st.none(), st.dictionaries(names, st.binary(max_size=8), max_size=4)),
           new=st.dictionaries(names, st.binary(max_size=8), min_size=1, max_size=3),
           own=st.booleans(), edited=st.booleans(), overwrite=st.booleans(), fail=st.booleans())  # fmt: skip
    def check(existing, new, own, edited, overwrite, fail):
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        (root / "beside.txt").write_bytes(b"neighbour")
        out = root / "out"
        if existing is not None:
            out.mkdir()
            for name, data in existing.items():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(data)
            if own:
                record_output(out, "writer")
            if edited and existing:
                (out / sorted(existing)[0]).write_bytes(b"edited by the user")
        replaceable = not existing or (own and not edited)
        before = snapshot(root)
        outcome = "written"
        try:
            with atomic_directory(out, "writer", overwrite=overwrite) as staging:
                for name, data in new.items():
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    (staging / name).write_bytes(data)
                if fail:
                    raise RuntimeError("simulated failure while writing")
        except OutputPathError:
            outcome = "refused"
        except RuntimeError:
            outcome = "failed"
        after = {p: d for p, d in snapshot(root).items() if not p.endswith(".align_detr_manifest.json")}
        before = {p: d for p, d in before.items() if not p.endswith(".align_detr_manifest.json")}
        assert after["beside.txt"] == before["beside.txt"]
        assert not [p for p in after if LEFTOVER.search(p)]
        if outcome != "written":
            assert after == before
            assert outcome == ("failed" if (replaceable or overwrite) else "refused")
            return
        assert not fail and (replaceable or overwrite)
        expected = {f"out/{name}": hashlib.sha256(data).hexdigest() for name, data in new.items()}
        files = {p: d for p, d in after.items() if p.startswith("out/") and d != "<dir>"}
        if replaceable:
            assert files == expected  # swapped: exactly the new content
        else:  # overwrite into a folder holding the user's files: theirs kept unless replaced by the same name;
            # the writer's own unchanged files that this write did not renew are gone (stale)
            own_unchanged = {f"out/{name}" for name in existing if own} - (
                {f"out/{sorted(existing)[0]}"} if edited else set())
            kept = {p: d for p, d in before.items()
                    if p.startswith("out/") and d != "<dir>" and p not in expected and p not in own_unchanged}
            assert files == {**kept, **expected}

    check()


def test_atomic_directory_swap_failure_puts_the_old_folder_back(tmp_path, monkeypatch):
    from align_detr_hf.file_io import atomic_directory, record_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    record_output(out, "writer")
    before = snapshot(tmp_path)
    real_replace = os.replace

    def fail_on_staging(src, dst):
        if ".staging-" in str(src) and "manifest" not in str(dst):
            raise OSError(5, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_staging)
    with pytest.raises(OSError, match="I/O error"):
        with atomic_directory(out, "writer") as staging:
            (staging / "config.json").write_text("new")
    assert snapshot(tmp_path) == before


def test_atomic_directory_old_copy_that_cannot_be_removed_is_a_warning(tmp_path, monkeypatch):
    import shutil

    from align_detr_hf.file_io import atomic_directory, record_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    record_output(out, "writer")
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: (_ for _ in ()).throw(OSError(16, "busy")))
    with pytest.warns(UserWarning, match=r"out was replaced, but its previous content, moved to .*\.out\.old-"):
        with atomic_directory(out, "writer") as staging:
            (staging / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new"


def test_demo_disk_full_while_writing_outputs_is_one_line(tmp_path, monkeypatch, capsys):
    import align_detr_hf.demo as demo

    real_owned_file = demo.owned_file

    @contextmanager
    def disk_full(path, *args, **kwargs):
        if Path(path).name == "metrics.json":
            raise OSError(28, "No space left on device", str(path))
        with real_owned_file(path, *args, **kwargs) as temp:
            yield temp

    monkeypatch.setattr(demo, "owned_file", disk_full)
    with time_limit(CASE_TIME_LIMIT_S), pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--output_dir", str(tmp_path / "demo"), "--quiet", "--num_train_images", "2",
                  "--num_val_images", "1", "--max_steps", "1", "--image_size", "64", "--d_model", "64",
                  "--num_queries", "3", "--threads", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert re.search(r"align-detr demo: error: No space left on device: .*metrics\.json", err)
    assert not (tmp_path / "demo" / "metrics.json").exists()


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """Temporary files and folders are private (0600/0700); what lands must look like any new file or folder."""
    from align_detr_hf.file_io import atomic_directory, atomic_write_bytes

    previous = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "model.onnx", b"graph")
        with atomic_directory(tmp_path / "converted", "writer") as staging:
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "model.onnx").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "converted").stat().st_mode & 0o777 == 0o755
