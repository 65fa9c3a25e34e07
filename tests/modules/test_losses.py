"""The fused frozen-head cross-entropy equals the plain one, in value and in gradient."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.models.families import tiny_model
from slimtune.modules.losses import IGNORE, LogitFreeLoss, frozen_head_cross_entropy, linear_cross_entropy


def _reference(h, w_or_labels, labels=None):
    """``F.cross_entropy`` on the full logits (``h @ w.T``, or ``h`` itself when given no weight)."""
    logits, labels = (h @ w_or_labels.t(), labels) if labels is not None else (h, w_or_labels)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@pytest.mark.parametrize("chunk", [1, 5, 64, 4096])
def test_frozen_head_ce_matches_reference(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g, dtype=torch.float64)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = -100
    labels[2, 7:] = -100
    h1 = h.clone().requires_grad_()
    h2 = h.clone().requires_grad_()
    fused = frozen_head_cross_entropy(h1, w, labels, chunk=chunk)
    ref = _reference(h2, w, labels)
    (fused * 3).backward()
    (ref * 3).backward()
    torch.testing.assert_close(fused, ref.to(fused.dtype), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-10)


def test_frozen_head_ce_all_ignored_is_zero_and_refuses_trainable_head():
    h = torch.randn(1, 4, 8, requires_grad=True)
    w = torch.randn(10, 8)
    loss = frozen_head_cross_entropy(h, w, torch.full((1, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="frozen"):
        frozen_head_cross_entropy(h, w.requires_grad_(), torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------- the trainer's logit-free loss on real models


def _batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :5] = IGNORE  # a prompt
    labels[1, 9:] = IGNORE  # padding
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "family,tied", [("llama", True), ("llama", False), ("qwen2", True), ("mistral", False), ("granite", True)]
)
def test_logit_free_loss_equals_the_models_own(family, tied):
    """Loss and every parameter's gradient (the tied or untied head's included) equal the model's own loss
    on the full logits, in fp64; the loss is scaled as the trainer scales it under gradient accumulation."""
    model = tiny_model(family, tie_word_embeddings=tied, dtype=torch.float64).train()
    head = model.get_output_embeddings()
    assert (head.weight is model.get_input_embeddings().weight) == tied
    batch = _batch(model.config.vocab_size)
    fn = LogitFreeLoss(model, head)
    assert fn.mismatch(batch["input_ids"]) is None
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = _reference(logits, batch["labels"])  # HF's loss in fp64 (transformers itself upcasts to fp32 only)
    (want / 4).backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    got = fn(batch)
    (got / 4).backward()
    assert model.get_output_embeddings() is head  # swapped back
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    mine = _grads(model)
    assert mine.keys() == ref.keys() and "lm_head.weight" in mine or tied
    for name, g in ref.items():
        torch.testing.assert_close(mine[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_logit_free_loss_refuses_soft_capped_logits():
    """Gemma 2 soft-caps its logits (not linear in the hidden state): the numeric check catches it, and the
    method contract does not offer the head in the first place."""
    from slimtune.methods import apply, make_config
    from slimtune.training.setup import loss_function

    model = tiny_model("gemma2")
    assert LogitFreeLoss(model, model.get_output_embeddings()).mismatch(_batch(256)["input_ids"]) is not None
    adapted = apply(model, make_config("full"))
    assert adapted.loss_head() is None
    batch = _batch(256)
    torch.testing.assert_close(loss_function(adapted, model, True)(batch), model(**batch).loss)


def test_second_backward_is_refused():
    h = torch.randn(1, 4, 8, requires_grad=True)
    loss = linear_cross_entropy(h, torch.randn(10, 8), torch.zeros(1, 4, dtype=torch.long))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_loss_term_measured_both_ways():
    """The bench's loss-term measurement: the model's own loss holds the logits, their log-softmax and their
    gradient (3 × [tokens, vocab] fp32); the logit-free loss holds one chunk of rows."""
    from slimtune.bench.figures import loss_term_bytes
    from slimtune.methods import apply, make_config

    model = tiny_model("llama", vocab_size=4096)
    adapted = apply(model, make_config("lora"))
    ids = torch.randint(3, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    got = loss_term_bytes(adapted, adapted.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                    "labels": ids})  # fmt: skip
    one = 2 * 64 * 4096 * 4
    assert 3 * one <= got["logits"] < 3.2 * one
    assert 0 < got["chunked"] < one / 4  # PyTorch picks chunks far below one [tokens, vocab] tensor
