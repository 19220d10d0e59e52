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
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 (1 means unsoftened)")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} must be in [0, 1]: 0 is plain cross-entropy, "
                         "1 is pure imitation of the teacher")
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab).float()
    t = teacher_logits.reshape(-1, vocab).float()
    soft = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                    log_target=True, reduction="batchmean") * temperature ** 2
    hard = F.cross_entropy(s, targets.reshape(-1), ignore_index=-100)
    return alpha * soft + (1 - alpha) * hard


def distill(teacher: nn.Module, student: nn.Module, train_ids: torch.Tensor, *, steps: int = 300,
            batch_size: int = 16, seq_len: int = 128, lr: float = 3e-3, temperature: float = 2.0,
            alpha: float = 0.5, seed: int = 0, progress: bool = True) -> list[float]:
    """Train ``student`` in place to imitate ``teacher``; return the loss of each step."""
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
    torch.manual_seed(seed)
    return TinyLM(STUDENT_CONFIG)


def load_student(path=None) -> TinyLM:
    """The committed student made by ``scripts/distill_student.py`` (eval mode, fp32)."""
    return load_checkpoint(STUDENT_PATH if path is None else path)
