"""Plain supervised training: the TEACHER and STUDENT (no KD) baselines."""

from __future__ import annotations

from cmkd.losses import cross_entropy
from cmkd.methods import register
from cmkd.methods.base import Distiller


@register("supervised")
class Supervised(Distiller):
    """Cross-entropy on one modality; `student` is simply the network being trained."""

    needs_teacher = False
    defaults = {}

    def forward(self, batch):
        logits = self.student(batch[self.input_key])
        return {"ce": cross_entropy(logits, batch["target"])}

    def deployables(self):
        return {"model": (self.student, self.input_key)}


@register("teacher")
class TeacherSupervised(Supervised):
    """Supervised training on the teacher modality."""

    input_key = "teacher_input"
