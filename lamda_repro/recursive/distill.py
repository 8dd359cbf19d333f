"""Token-level distillation losses between a teacher (the full-size model) and a student.

All losses compare next-token distributions position by position and average over the positions
selected by ``mask``. Forward KL, KL(p_teacher || p_student), is the default (best in the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tv")


class DistillConfigError(ValueError):
    """An invalid distillation setting (loss name, weight)."""


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over (masked) positions of the divergence ``kind`` between teacher and student."""
    if kind not in KD_LOSSES:
        raise DistillConfigError(f"kd loss must be one of {KD_LOSSES}, got {kind!r}")
    if student_logits.shape != teacher_logits.shape:
        raise DistillConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        per_position = _kl(log_t, log_s)
    elif kind == "reverse_kl":
        per_position = _kl(log_s, log_t)
    elif kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - torch.log(torch.tensor(2.0))
        per_position = 0.5 * _kl(log_t, log_m) + 0.5 * _kl(log_s, log_m)
    else:
        per_position = 0.5 * (log_s.exp() - log_t.exp()).abs().sum(dim=-1)
    per_position = per_position * temperature**2 if kind in ("forward_kl", "reverse_kl") else per_position
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0)


def combined_loss(lm_loss: torch.Tensor, kd_loss: torch.Tensor | None, kd_weight: float) -> torch.Tensor:
    """(1 - w) * LM + w * KD: w = 0 is plain uptraining, w = 1 pure distillation."""
    if not 0.0 <= kd_weight <= 1.0:
        raise DistillConfigError(f"kd_weight must lie in [0, 1], got {kd_weight}")
    if kd_loss is None or kd_weight == 0.0:
        return lm_loss
    return (1.0 - kd_weight) * lm_loss + kd_weight * kd_loss
