"""The checks transformers runs on every model (its common mixin is not in the wheel, so they are written here) for
both classes: determinism, save/load, batching, dict vs tuple, hidden states and attentions, gradient checkpointing,
training, fine-tuning with new classes, the forward signature, the loss hook and the Trainer's inference keys."""

import inspect
import math
from dataclasses import fields

import pytest
import torch
from conftest import NOISE_FACTOR, float32_noise, tiny_config

from align_detr_hf import AlignDetrConfig, AlignDetrForObjectDetection, AlignDetrLoss, AlignDetrModel
from align_detr_hf.loss_align_detr import AlignDetrLossInputs, DenoisingLayout, build_loss
from align_detr_hf.modeling_align_detr import AlignDetrModelOutput, AlignDetrObjectDetectionOutput

BATCH, SIZE = 2, 64
# encoder positions: strides 8, 16, 32 from the backbone and one extra stride-64 level
NUM_POSITIONS = sum(math.ceil(SIZE / stride) ** 2 for stride in (8, 16, 32, 64))
MODEL_CLASSES = [AlignDetrModel, AlignDetrForObjectDetection]
LABELS = [
    {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
    {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
]
ATTENTION_FIELDS = ("encoder_attentions", "decoder_attentions", "cross_attentions")
HIDDEN_STATE_FIELDS = ("encoder_hidden_states", "decoder_hidden_states")


def _model(model_class, **config_overrides):
    torch.manual_seed(0)
    model = model_class(tiny_config(**config_overrides))
    with torch.no_grad():  # zero-initialised layers (last box layers, attention offsets/weights) hide gradients
        for param in model.parameters():
            if param.ndim == 2 and param.abs().sum() == 0:
                param.normal_(std=0.01)
    return model.eval()


def _pixels(batch=BATCH, seed=0):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _inputs(model_class, train):
    kwargs = {"pixel_values": _pixels()}
    if train:  # AlignDetrModel uses labels for the denoising queries, the head class for the loss too
        kwargs["labels"] = LABELS
    return kwargs


def _assert_same(a, b, path="output"):
    """Recursive equality of outputs: tensors bit-equal, containers element by element, plain values by ==."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), path
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}[{key!r}]")
    else:
        assert a == b, path


def _run(model, seed=1, **kwargs):
    torch.manual_seed(seed)  # the same denoising draws in training
    with torch.set_grad_enabled(model.training):
        return model(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Determinism, save/load, batching
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_eval_is_deterministic(model_class):
    model = _model(model_class)
    first, second = _run(model, pixel_values=_pixels()), _run(model, seed=2, pixel_values=_pixels())
    _assert_same(first.to_tuple(), second.to_tuple())


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_save_load_round_trip_is_exact(model_class, tmp_path):
    model = _model(model_class)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = model_class.from_pretrained(tmp_path).eval()
    assert model.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(t, loaded.state_dict()[k]) for k, t in model.state_dict().items())
    kwargs = {"pixel_values": _pixels(), "output_attentions": True, "output_hidden_states": True}
    _assert_same(_run(model, **kwargs).to_tuple(), _run(loaded, **kwargs).to_tuple())


def test_head_model_loads_base_weights_and_base_loads_from_head(tmp_path):
    base = _model(AlignDetrModel)
    base.save_pretrained(tmp_path / "base")
    head = AlignDetrForObjectDetection.from_pretrained(tmp_path / "base")
    assert all(torch.equal(t, head.model.state_dict()[k]) for k, t in base.state_dict().items())
    head.save_pretrained(tmp_path / "head")
    base_again = AlignDetrModel.from_pretrained(tmp_path / "head")
    assert all(torch.equal(t, base_again.state_dict()[k]) for k, t in head.model.state_dict().items())


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_batch_equals_one_by_one_on_unpadded_images(model_class):
    model = _model(model_class)
    pixel_values = _pixels(batch=3)
    names = ["last_hidden_state", "enc_topk_logits", "enc_topk_boxes", "encoder_last_hidden_state"]
    names += (["logits", "pred_boxes", "intermediate_logits", "intermediate_pred_boxes"]
              if model_class is AlignDetrForObjectDetection
              else ["intermediate_pred_boxes", "intermediate_hidden_states", "intermediate_reference_points"])

    def outputs(out, i=0):  # every tensor output is batch-first, the per-layer ones too
        return {**{name: getattr(out, name)[i] for name in names}, "decoder_attentions": out.decoder_attentions[-1][i]}

    # tolerances: the float32 rounding noise of the one-image runs, measured against float64 (see conftest)
    singles = [{"pixel_values": pixel_values[i : i + 1], "output_attentions": True} for i in range(3)]
    noise = float32_noise(model, singles, outputs)
    batched = _run(model, pixel_values=pixel_values, output_attentions=True)
    for i in range(3):
        single = _run(model, **singles[i])
        assert torch.equal(single.enc_topk_indices[0], batched.enc_topk_indices[i])
        for name, theirs in outputs(single).items():
            torch.testing.assert_close(outputs(batched, i)[name], theirs, atol=NOISE_FACTOR * noise[name], rtol=0,
                                       msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# Dict vs tuple
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
@pytest.mark.parametrize("train,extras", [(False, False), (True, True)],
                         ids=["eval", "train_with_labels_hidden_states_and_attentions"])
def test_return_dict_false_equals_the_dict_output_element_by_element(model_class, train, extras):
    model = _model(model_class).train(train)
    kwargs = {**_inputs(model_class, train), "output_attentions": extras, "output_hidden_states": extras}
    as_dict = _run(model, **kwargs)
    as_tuple = _run(model, return_dict=False, **kwargs)
    assert isinstance(as_tuple, tuple)
    _assert_same(as_dict.to_tuple(), as_tuple)
    # the tuple follows the dataclass' field order, skipping None fields; nothing is an untyped dict but loss terms
    names = [f.name for f in fields(type(as_dict)) if getattr(as_dict, f.name) is not None]
    assert list(as_dict.keys()) == names and len(as_tuple) == len(names)
    assert all(not isinstance(v, dict) for k, v in as_dict.items() if k != "loss_dict")
    if train:  # the denoising part travels as plain ints
        assert isinstance(as_dict.num_denoising_groups, int) and isinstance(as_dict.denoising_max_gt, int)
        assert as_dict.num_denoising_queries == 2 * as_dict.denoising_max_gt * as_dict.num_denoising_groups > 0
    model.config.return_dict = False  # the config default
    _assert_same(_run(model, **kwargs), as_tuple)


# ---------------------------------------------------------------------------------------------------------------------
# Hidden states and attentions
# ---------------------------------------------------------------------------------------------------------------------


def _check_shapes_and_meaning(model, out, num_decoder_queries):
    config = model.config
    base = model.model if isinstance(model, AlignDetrForObjectDetection) else model
    d, heads, levels = config.d_model, config.encoder_attention_heads, config.num_feature_levels

    assert len(out.encoder_hidden_states) == config.encoder_layers + 1
    assert all(h.shape == (BATCH, NUM_POSITIONS, d) for h in out.encoder_hidden_states)
    assert torch.equal(out.encoder_hidden_states[-1], out.encoder_last_hidden_state)
    assert len(out.decoder_hidden_states) == config.decoder_layers + 1
    assert all(h.shape == (BATCH, num_decoder_queries, d) for h in out.decoder_hidden_states)
    # a decoder hidden state is what the next layer receives; the final LayerNorm of the last one is the output
    normed = base.decoder.layer_norm(out.decoder_hidden_states[-1][:, -config.num_queries :])
    torch.testing.assert_close(normed, out.last_hidden_state, atol=1e-6, rtol=0)

    assert len(out.encoder_attentions) == config.encoder_layers
    for weights in out.encoder_attentions:
        assert weights.shape == (BATCH, NUM_POSITIONS, heads, levels, config.encoder_n_points)
        torch.testing.assert_close(weights.sum((-2, -1)), torch.ones(weights.shape[:3]))
    assert len(out.decoder_attentions) == len(out.cross_attentions) == config.decoder_layers
    for weights in out.decoder_attentions:
        assert weights.shape == (BATCH, config.decoder_attention_heads, num_decoder_queries, num_decoder_queries)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:3]))
    for weights in out.cross_attentions:
        assert weights.shape == (BATCH, num_decoder_queries, config.decoder_attention_heads, levels,
                                 config.decoder_n_points)
        torch.testing.assert_close(weights.sum((-2, -1)), torch.ones(weights.shape[:3]))
    tensors = [*out.encoder_hidden_states, *out.decoder_hidden_states, *out.encoder_attentions,
               *out.decoder_attentions, *out.cross_attentions]
    assert all(torch.isfinite(t).all() for t in tensors)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
@pytest.mark.parametrize("source", ["argument", "config"])
def test_hidden_states_and_attentions_shapes_and_meaning(model_class, source):
    model = _model(model_class)
    plain = _run(model, pixel_values=_pixels())
    assert all(getattr(plain, name) is None for name in HIDDEN_STATE_FIELDS + ATTENTION_FIELDS)
    if source == "argument":
        out = _run(model, pixel_values=_pixels(), output_hidden_states=True, output_attentions=True)
    else:
        model.config.output_hidden_states = True
        model.config.output_attentions = True
        out = _run(model, pixel_values=_pixels())
        # an explicit argument wins over the config default
        off = _run(model, pixel_values=_pixels(), output_hidden_states=False, output_attentions=False)
        assert all(getattr(off, name) is None for name in HIDDEN_STATE_FIELDS + ATTENTION_FIELDS)
    _check_shapes_and_meaning(model, out, model.config.num_queries)
    # the explicit-softmax self-attention path gives the SDPA path's outputs
    name = "logits" if model_class is AlignDetrForObjectDetection else "last_hidden_state"
    torch.testing.assert_close(getattr(out, name), getattr(plain, name), atol=1e-5, rtol=0)


def test_hidden_states_are_recorded_one_kind_at_a_time():
    model = _model(AlignDetrForObjectDetection)
    hidden = _run(model, pixel_values=_pixels(), output_hidden_states=True)
    assert all(getattr(hidden, name) is None for name in ATTENTION_FIELDS)
    assert all(getattr(hidden, name) is not None for name in HIDDEN_STATE_FIELDS)
    attentions = _run(model, pixel_values=_pixels(), output_attentions=True)
    assert all(getattr(attentions, name) is None for name in HIDDEN_STATE_FIELDS)
    assert all(getattr(attentions, name) is not None for name in ATTENTION_FIELDS)


def test_decoder_attentions_in_training_cover_denoising_queries_and_respect_their_mask():
    model = _model(AlignDetrForObjectDetection).train()
    out = _run(model, pixel_values=_pixels(), labels=LABELS, output_attentions=True, output_hidden_states=True)
    num_dn = out.num_denoising_queries
    _check_shapes_and_meaning(model, out, num_dn + model.config.num_queries)
    for weights in out.decoder_attentions:
        assert weights[:, :, num_dn:, :num_dn].abs().max() == 0  # matching queries never see the answers
        group = 2 * out.denoising_max_gt  # denoising groups do not see each other
        assert weights[:, :, :group, group:num_dn].abs().max() == 0


def test_output_attentions_keeps_mmdetection_parity(small_model, small_inputs, small_outputs):
    with torch.no_grad():
        out = small_model(small_inputs["pixel_values"], small_inputs["pixel_mask"].long(), output_attentions=True,
                          output_hidden_states=True)
    assert torch.equal(out.enc_topk_indices, small_outputs["enc_topk_indices"])
    torch.testing.assert_close(out.intermediate_logits, small_outputs["all_dec_logits"].transpose(0, 1), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(out.intermediate_pred_boxes, small_outputs["all_dec_boxes"].transpose(0, 1),
                               atol=1e-5, rtol=0)
    assert len(out.decoder_attentions) == small_model.config.decoder_layers


# ---------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing and training
# ---------------------------------------------------------------------------------------------------------------------


def _base_model_objective(out):
    """A scalar through every output of AlignDetrModel that carries gradients (it has no loss of its own)."""
    return (out.last_hidden_state.square().mean() + out.intermediate_pred_boxes.sum() + out.enc_topk_boxes.sum()
            + out.enc_topk_logits.sigmoid().mean())


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_gradient_checkpointing_gives_the_same_gradients(model_class):
    model = _model(model_class).train()

    def gradients(**kwargs):
        model.zero_grad()
        out = _run(model, pixel_values=_pixels(), labels=LABELS, **kwargs)
        (out.loss if model_class is AlignDetrForObjectDetection else _base_model_objective(out)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # the same output flags on both sides: output_attentions switches self-attention to its explicit-softmax path
    plain = gradients(output_attentions=True, output_hidden_states=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        checkpointed = gradients(output_attentions=True, output_hidden_states=True)
    finally:
        model.gradient_checkpointing_disable()
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_base_model_trains_through_a_downstream_objective():
    model = _model(AlignDetrModel).train()
    out = _run(model, pixel_values=_pixels(), labels=LABELS)
    assert out.num_denoising_queries > 0  # labels draw denoising queries in training
    _base_model_objective(out).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []  # the denoising label embedding too, through the denoising queries' boxes
    assert all(torch.isfinite(p.grad).all() for p in trainable.values() if p.grad is not None)


def test_detection_model_training_step_updates_weights_and_lowers_the_loss():
    model = _model(AlignDetrForObjectDetection).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(4):
        out = _run(model, pixel_values=_pixels(), labels=LABELS)
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning with new classes, forward signature
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_from_pretrained_to_a_new_number_of_classes(model_class, tmp_path):
    _model(AlignDetrForObjectDetection).save_pretrained(tmp_path)
    new_classes = {i: f"class_{i}" for i in range(5)}
    with pytest.raises(RuntimeError, match="size mismatch|ignore_mismatched_sizes"):
        model_class.from_pretrained(tmp_path, id2label=new_classes)
    model = model_class.from_pretrained(tmp_path, id2label=new_classes, ignore_mismatched_sizes=True).eval()
    assert model.config.num_labels == 5
    out = _run(model, pixel_values=_pixels())
    assert out.enc_topk_logits.shape == (BATCH, 12, 5)
    if model_class is AlignDetrForObjectDetection:
        assert out.logits.shape == (BATCH, 12, 5) and torch.isfinite(out.logits).all()
        model.train()
        labels = [{"class_labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * BATCH
        assert torch.isfinite(_run(model, pixel_values=_pixels(), labels=labels).loss)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_forward_signature(model_class):
    names = list(inspect.signature(model_class.forward).parameters)
    assert names[:4] == ["self", "pixel_values", "pixel_mask", "labels"]
    assert {"output_attentions", "output_hidden_states", "return_dict"} <= set(names)
    assert model_class.main_input_name == "pixel_values"


# ---------------------------------------------------------------------------------------------------------------------
# Loss hook and Trainer keys
# ---------------------------------------------------------------------------------------------------------------------


def test_loss_function_is_settable_like_transformers_own():
    model = _model(AlignDetrForObjectDetection).train()
    assert isinstance(model.loss_function, AlignDetrLoss)
    seen = {}

    def constant_loss(inputs, labels):
        seen["inputs"] = inputs
        value = inputs.logits.sum() * 0 + 7.0
        return value, {"loss_constant": value}

    model.loss_function = constant_loss
    out = _run(model, pixel_values=_pixels(), labels=LABELS)
    assert out.loss.item() == 7.0 and list(out.loss_dict) == ["loss_constant"]
    assert isinstance(seen["inputs"], AlignDetrLossInputs) and seen["inputs"].dn_logits is not None
    assert isinstance(seen["inputs"].denoising, DenoisingLayout) and seen["inputs"].layer_names == ["d0.", ""]

    class HalfLoss(torch.nn.Module):  # a module is accepted too (nn.Module would register it as a submodule)
        def forward(self, outputs, labels):
            loss, loss_dict = build_loss(model.config)(outputs, labels)
            return loss / 2, loss_dict

    full = _run(model.__class__.from_pretrained(None, config=model.config, state_dict=model.state_dict()).train(),
                pixel_values=_pixels(), labels=LABELS).loss
    model.loss_function = HalfLoss()
    assert isinstance(model.loss_function, HalfLoss)
    torch.testing.assert_close(_run(model, pixel_values=_pixels(), labels=LABELS).loss, full / 2)
    model.loss_function = None  # back to the default
    assert isinstance(model.loss_function, AlignDetrLoss)


def test_keys_to_ignore_at_inference_follow_the_output_dataclass():
    ignored = AlignDetrConfig().keys_to_ignore_at_inference
    assert ignored == [f.name for f in fields(AlignDetrObjectDetectionOutput)
                       if f.name not in ("loss", "loss_dict", "logits", "pred_boxes")]
    assert set(HIDDEN_STATE_FIELDS + ATTENTION_FIELDS) <= set(ignored)
    # what Trainer.prediction_step keeps of an evaluation output with labels, everything requested
    model = _model(AlignDetrForObjectDetection)
    out = _run(model, pixel_values=_pixels(), labels=LABELS, output_attentions=True, output_hidden_states=True)
    kept = [k for k in out.keys() if k not in model.config.keys_to_ignore_at_inference + ["loss"]]
    assert kept == ["loss_dict", "logits", "pred_boxes"]
    # the base model's output shares the field names it has in common with the head's
    assert {f.name for f in fields(AlignDetrModelOutput)} - {f.name for f in fields(AlignDetrObjectDetectionOutput)} \
        == {"intermediate_hidden_states", "intermediate_reference_points"}
