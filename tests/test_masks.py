"""What `pixel_mask` means (1 = real pixel, 0 = padding, real pixels on a top-left rectangle), the masks we honour,
the ones refused with a clear error, and an all-padding image in a batch: finite outputs, loss and gradients."""

import pytest
import torch
from conftest import tiny_config

from align_detr_hf import AlignDetrForObjectDetection

HEIGHT, WIDTH = 64, 96
LABELS = [
    {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
    {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
]
NO_LABELS = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config())
    with torch.no_grad():  # zero-initialised layers (last box layers, attention offsets/weights) hide gradients
        for param in model.parameters():
            if param.ndim == 2 and param.abs().sum() == 0:
                param.normal_(std=0.01)
    return model.eval()


@pytest.fixture(scope="module")
def pixel_values():
    return torch.randn(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))


def _mask(**image1):
    """Batch mask of two images; image 0 unpadded, image 1 real on [:height, :width] (default: unpadded)."""
    mask = torch.ones(2, HEIGHT, WIDTH, dtype=torch.long)
    mask[1] = 0
    mask[1, : image1.get("height", HEIGHT), : image1.get("width", WIDTH)] = 1
    return mask


def _tensors(output):
    for value in output.values():
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, dict):
            yield from value.values()
        elif isinstance(value, tuple):
            yield from value


def test_all_padding_image_gives_finite_outputs_and_leaves_its_neighbour_alone(model, pixel_values):
    mask = _mask(height=0)
    with torch.no_grad():
        together = model(pixel_values, mask, output_attentions=True, output_hidden_states=True)
        alone = model(pixel_values[:1])
    assert all(torch.isfinite(t).all() for t in _tensors(together))
    # the empty slot changes nothing for the real image (everything it does is per image)
    torch.testing.assert_close(together.logits[0], alone.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together.pred_boxes[0], alone.pred_boxes[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("empty_image_labels", ["none", "one_box"])
def test_all_padding_image_gives_finite_loss_and_every_gradient_finite(model, pixel_values, empty_image_labels):
    """Issue 15: a finite loss but NaN gradients in ~58 parameters, which the next optimizer step spreads."""
    labels = [LABELS[0], NO_LABELS if empty_image_labels == "none" else LABELS[1]]
    model.train()
    try:
        model.zero_grad()
        torch.manual_seed(0)
        out = model(pixel_values, _mask(height=0), labels=labels)
        assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.loss_dict.values())
        out.loss.backward()
    finally:
        model.eval()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    not_finite = [name for name, g in grads.items() if not torch.isfinite(g).all()]
    assert not_finite == []
    assert sum(g.abs().sum() for g in grads.values()) > 0


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (HEIGHT, 1), (1, WIDTH)])
def test_tiny_real_region_is_finite_and_never_selects_padding(model, pixel_values, size):
    """A real region smaller than a cell of the coarsest level still gives every level one valid cell."""
    with torch.no_grad():
        out = model(pixel_values, _mask(height=size[0], width=size[1]))
    assert all(torch.isfinite(t).all() for t in _tensors(out))


def test_mask_dtypes_bool_float_and_int_mean_the_same(model, pixel_values):
    mask = _mask(height=40, width=50)
    with torch.no_grad():
        expected = model(pixel_values, mask)
        for variant in (mask.bool(), mask.float(), mask.to(torch.uint8), mask.int()):
            out = model(pixel_values, variant)
            assert torch.equal(out.logits, expected.logits) and torch.equal(out.pred_boxes, expected.pred_boxes)


def _bad_masks():
    good = _mask(height=40, width=50)
    zero_first_row, zero_first_col, top, letterbox = (_mask() for _ in range(4))
    zero_first_row[1, 0] = 0
    zero_first_col[1, :, 0] = 0
    top[1, :20] = 0
    letterbox[1, :8], letterbox[1, -8:] = 0, 0
    hole = _mask()
    hole[1, 10:20, 10:20] = 0
    half, two, minus, nan = good.float(), good.clone(), good.clone(), good.float()
    half[1, 0, 0], two[1, 5, 5], minus[1, 2, 2], nan[1, 3, 3] = 0.5, 2, -1, float("nan")
    top_left = "top-left pixel is padding"
    inverted = "Is it inverted\\? Here 1 marks real pixels"
    return [
        ("zero_first_row", zero_first_row, top_left),
        ("zero_first_col", zero_first_col, top_left),
        ("top_padding", top, top_left),
        ("letterbox", letterbox, "letterbox"),
        ("hole", hole, "do not form one top-left rectangle"),
        ("detr_convention_1_is_padding", 1 - good, inverted),
        ("detr_convention_unpadded_batch", torch.zeros_like(good), "all zeros .* for every image.*" + inverted),
        ("value_half", half, "only 1 \\(real pixel\\) and 0 \\(padding\\); image 1 holds 0.5"),
        ("value_two", two, "image 1 holds 2"),
        ("value_minus_one", minus, "image 1 holds -1"),
        ("value_nan", nan, "image 1 holds nan"),
    ]


@pytest.mark.parametrize("name,mask,message", _bad_masks(), ids=[case[0] for case in _bad_masks()])
def test_masks_we_cannot_honour_are_refused_naming_the_problem(model, pixel_values, name, mask, message):
    """Before: all-NaN outputs (padding at the top/left) or constant 0.999 boxes (inverted masks)."""
    with pytest.raises(ValueError, match=message) as error:
        with torch.no_grad():
            model(pixel_values, mask)
    if name not in ("detr_convention_unpadded_batch",):
        assert "image 1" in str(error.value)


def test_bad_mask_is_refused_in_training_before_any_gradient(model, pixel_values):
    mask = _mask()
    mask[1, :, :4] = 0
    model.train()
    try:
        with pytest.raises(ValueError, match="pixel_mask of image 1"):
            model(pixel_values, mask, labels=LABELS)
    finally:
        model.eval()
