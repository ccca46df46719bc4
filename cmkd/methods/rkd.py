"""RKD, relational KD (Park et al., CVPR 2019): the student's embeddings keep the teacher's
distance (pairs) and angle (triples) relations; `cmkd.losses.rkd_loss`.

    CE + rkd_weight * (distance_weight * L_D + angle_weight * L_A)

on the penultimate embeddings (stage `features`; weights 25 and 50 as the paper and
RepDistiller). A segmentation network's per-pixel features are averaged over space first
(one embedding per image: relations between the images of a batch).
"""

from __future__ import annotations

from cmkd.losses import rkd_loss
from cmkd.methods import register
from cmkd.methods.feature import FeatureDistiller, pooled


@register("rkd")
class RKD(FeatureDistiller):
    defaults = {"ce_weight": 1.0, "rkd_weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0, "stage": "features"}

    def __init__(self, student, teacher, cfg, num_classes):
        super().__init__(student, teacher, cfg, num_classes)
        self.student_stage = self.resolve_stage(student, str(self.cfg["stage"]), "student", "stage")
        self.teacher_stage = self.resolve_stage(teacher, str(self.cfg["stage"]), "teacher", "stage")

    def forward(self, batch):
        s_out, t_out = self.run_both(batch, [self.student_stage], [self.teacher_stage])
        relational = rkd_loss(pooled(s_out[self.student_stage]), pooled(t_out[self.teacher_stage]),
                              float(self.cfg["distance_weight"]), float(self.cfg["angle_weight"]))
        return {"ce": self.ce(s_out, batch), "rkd": self.cfg["rkd_weight"] * relational}
