"""Knowledge distillation: train a small student to imitate the tiny LM (the teacher).

The student learns from two signals at once (Hinton et al., 2015):

* the teacher's whole next-token distribution, softened by a temperature ``T``:
  ``KL(softmax(teacher / T) || softmax(student / T)) * T**2``. The soft targets say
  which wrong tokens are *almost* right, far more information per example than
  one correct byte. The ``T**2`` keeps its gradient on the same scale as the
  cross-entropy's whatever ``T`` is.
* the true next token: ordinary cross-entropy.

``alpha`` weighs the two: ``alpha * soft + (1 - alpha) * hard``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..model import ModelConfig, TinyLM, load_checkpoint, random_windows
from ..model.checkpoint import TINY_LM_PATH
from ..validate import bad, check_int, check_probability, check_real

STUDENT_PATH = TINY_LM_PATH.with_name("student_lm.safetensors")
# Half the width and half the depth of the teacher: about a quarter of its weights.
STUDENT_CONFIG = ModelConfig(vocab_size=264, dim=96, n_layers=2, n_heads=4, n_kv_heads=2,
                             ffn_dim=256, max_seq_len=1024)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor, temperature: float = 2.0, alpha: float = 0.5,
                      ) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets)``.

    Logits are (..., vocab); ``targets`` are token ids shaped like the logits
    without the last dimension (-100 entries are ignored by the cross-entropy).
    """
    _check_loss_args(student_logits, teacher_logits, targets, temperature, alpha)
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab).float()
    t = teacher_logits.reshape(-1, vocab).float()
    soft = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                    log_target=True, reduction="batchmean") * temperature ** 2
    hard = F.cross_entropy(s, targets.reshape(-1), ignore_index=-100)
    return alpha * soft + (1 - alpha) * hard


def _check_mix(temperature, alpha) -> None:
    check_real("temperature", temperature, low=0.0, low_open=True, why="1 means unsoftened")
    check_probability("alpha", alpha, why="0 is plain cross-entropy, 1 is pure imitation of the teacher")


def _check_loss_args(student_logits, teacher_logits, targets, temperature, alpha) -> None:
    _check_mix(temperature, alpha)
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise bad(name, t, "a torch.Tensor")
    if teacher_logits.shape != student_logits.shape:
        raise bad("teacher_logits", f"tensor of shape {tuple(teacher_logits.shape)}",
                  f"the student_logits' shape {tuple(student_logits.shape)}", "both models share a vocabulary")
    if targets.shape != student_logits.shape[:-1]:
        raise bad("targets", f"tensor of shape {tuple(targets.shape)}",
                  f"the logits' shape without the vocabulary: {tuple(student_logits.shape[:-1])}")


def _check_distill_args(train_ids, steps, batch_size, seq_len, lr, seed) -> None:
    check_int("steps", steps, low=1)
    check_int("batch_size", batch_size, low=1)
    check_int("seq_len", seq_len, low=1)
    check_real("lr", lr, low=0.0, low_open=True)
    check_int("seed", seed)
    if not isinstance(train_ids, torch.Tensor) or train_ids.dim() != 1 or train_ids.is_floating_point():
        raise bad("train_ids", train_ids, "a 1-D tensor of token ids")
    if train_ids.numel() <= seq_len:
        raise bad("train_ids", f"{train_ids.numel()} ids", f"more than seq_len={seq_len} ids",
                  "each training window is seq_len ids long")


def distill(teacher: nn.Module, student: nn.Module, train_ids: torch.Tensor, *, steps: int = 300,
            batch_size: int = 16, seq_len: int = 128, lr: float = 3e-3, temperature: float = 2.0,
            alpha: float = 0.5, seed: int = 0, progress: bool = True) -> list[float]:
    """Train ``student`` in place to imitate ``teacher``; return the loss of each step."""
    _check_distill_args(train_ids, steps, batch_size, seq_len, lr, seed)
    _check_mix(temperature, alpha)
    generator = torch.Generator().manual_seed(seed)
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    bar = tqdm(range(steps), desc="distil", unit="step", disable=not progress)
    for step in bar:
        # Linear warm-up over the first 10% then linear decay: short runs need both.
        warm = max(1, steps // 10)
        scale = (step + 1) / warm if step < warm else (steps - step) / (steps - warm)
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x, y = random_windows(train_ids, batch_size, seq_len, generator)
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = distillation_loss(student(x), teacher_logits, y, temperature, alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    student.eval()
    return losses


def new_student(seed: int = 0) -> TinyLM:
    """A freshly initialised student with :data:`STUDENT_CONFIG`."""
    check_int("seed", seed)
    torch.manual_seed(seed)
    return TinyLM(STUDENT_CONFIG)


def load_student(path=None) -> TinyLM:
    """The committed student made by ``scripts/distill_student.py`` (eval mode, fp32)."""
    return load_checkpoint(STUDENT_PATH if path is None else path)
