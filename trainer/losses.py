"""The fine-tuner's training objectives: cross-entropy, R-Drop, FGM adversarial training and distillation.

Each function either returns a loss for ``accelerator.backward`` or runs its own backward passes (the
adversarial ones, whose second pass needs the first one's gradient). Logits are cast to fp32 before a loss,
so every loss is computed in full precision under mixed precision.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from trainer.settings import DISTILL_ALPHA, DISTILL_TEMPERATURE


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton et al. (2015): cross-entropy on the labels, plus KL from the teacher's distribution at
    temperature T to the student's (times T^2, so its gradients keep their size as T changes)."""
    t = DISTILL_TEMPERATURE
    kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher.float() / t, -1), log_target=True,
                  reduction="batchmean") * t * t
    return (1 - DISTILL_ALPHA) * F.cross_entropy(logits, labels, weight=weight) + DISTILL_ALPHA * kl


def symmetric_kl(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """R-Drop's distance between two predictions (logits): the mean of KL(p||q) and KL(q||p)."""
    log_p, log_q = F.log_softmax(first, -1), F.log_softmax(second, -1)
    return (F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
            + F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")) / 2


def classification_loss(model, batch: dict, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the batch (each example weighted by its label's ``weight`` when given)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits.float(), batch["labels"], weight=weight)


def rdrop_loss(model, batch: dict, alpha: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """R-Drop: the batch twice in one forward pass (independent dropout masks), cross-entropy of both
    halves plus ``alpha`` times the symmetric KL divergence between their predicted distributions."""
    labels = batch["labels"]
    inputs = {k: torch.cat([v, v]) for k, v in batch.items() if k != "labels"}
    first, second = model(**inputs).logits.float().chunk(2)
    ce = (F.cross_entropy(first, labels, weight=weight) + F.cross_entropy(second, labels, weight=weight)) / 2
    return ce + alpha * symmetric_kl(first, second)


@contextlib.contextmanager
def pushed_embeddings(accelerator: Accelerator, model, epsilon: float):
    """FGM (Miyato et al. 2017), after a backward pass: inside, the word embeddings are moved ``epsilon``
    (L2 norm) along the gradient the loss has on them; on exit they are put back. Yields whether they
    moved (not when the gradient is missing, zero or not finite). The table's gradient is nonzero only in
    this batch's rows, so only the batch's tokens move."""
    weight = accelerator.unwrap_model(model).get_input_embeddings().weight
    norm = weight.grad.norm() if weight.grad is not None else None
    if norm is None or not torch.isfinite(norm) or norm == 0:
        yield False
        return
    delta = (epsilon / norm) * weight.grad
    weight.data.add_(delta)
    try:
        yield True
    finally:
        weight.data.sub_(delta)


def adversarial_backward(accelerator: Accelerator, model, batch: dict, epsilon: float,
                         weight: torch.Tensor | None = None) -> None:
    """FGM after the clean backward pass: backpropagate the loss at the pushed embeddings too (gradients
    add up)."""
    with pushed_embeddings(accelerator, model, epsilon) as moved:
        if moved:
            accelerator.backward(classification_loss(model, batch, weight))


def adversarial_rdrop_backward(accelerator: Accelerator, model, batch: dict, alpha: float,
                               epsilon: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """R-Drop whose pair is the clean batch and its FGM copy (two passes where R-Drop + FGM take three):
    cross-entropy of the clean batch, backward; then at the pushed embeddings cross-entropy plus ``alpha``
    times the symmetric KL to the clean prediction, which is held fixed (the pushed one is pulled to it,
    as in virtual adversarial training), backward. Returns R-Drop's loss over the pair, for the log."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    clean = model(**inputs).logits.float()
    clean_ce = F.cross_entropy(clean, labels, weight=weight)
    accelerator.backward(clean_ce)
    clean = clean.detach()
    with pushed_embeddings(accelerator, model, epsilon):
        pushed = model(**inputs).logits.float()
        pushed_ce, kl = F.cross_entropy(pushed, labels, weight=weight), symmetric_kl(clean, pushed)
        accelerator.backward(pushed_ce + alpha * kl)
    return ((clean_ce + pushed_ce) / 2 + alpha * kl).detach()
