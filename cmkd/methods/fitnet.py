"""FitNets (Romero et al., ICLR 2015): a hint from a teacher stage to a student stage.

A learned regressor (a 1x1 convolution; on vector stages the same thing as a linear layer)
maps the student stage ("guided layer") to the teacher stage's channels ("hint layer"); the
loss is CE + hint_weight * MSE(regressor(student stage), teacher stage). Stages default to
each network's `intermediate_stage` (the middle of the network, as the paper's hint layer);
a student map of another spatial size is resized bilinearly to the teacher's. The paper's
separate hint pre-training stage is not run: the hint is trained jointly with CE, as the
RepDistiller benchmark does (hint weight 100 there).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from cmkd.errors import ConfigError
from cmkd.methods import register
from cmkd.methods.feature import FeatureDistiller, match_spatial


@register("fitnet")
class FitNet(FeatureDistiller):
    defaults = {"ce_weight": 1.0, "hint_weight": 100.0, "student_stage": "auto", "teacher_stage": "auto"}

    def __init__(self, student, teacher, cfg, num_classes):
        super().__init__(student, teacher, cfg, num_classes)
        self.student_stage = self.resolve_stage(student, str(self.cfg["student_stage"]), "student", "student_stage")
        self.teacher_stage = self.resolve_stage(teacher, str(self.cfg["teacher_stage"]), "teacher", "teacher_stage")
        self.regressor = nn.Conv2d(student.stage_channels[self.student_stage],
                                   teacher.stage_channels[self.teacher_stage], 1)

    def regress(self, s):
        if s.dim() == 2:
            return self.regressor(s[:, :, None, None])[:, :, 0, 0]
        return self.regressor(s)

    def forward(self, batch):
        s_out, t_out = self.run_both(batch, [self.student_stage], [self.teacher_stage])
        s, t = self.regress(s_out[self.student_stage]), t_out[self.teacher_stage]
        if s.dim() != t.dim():
            raise ConfigError(self.key("student_stage"),
                              f"stage {self.student_stage!r} of the student is {s.dim()}-D but "
                              f"stage {self.teacher_stage!r} of the teacher is {t.dim()}-D; pick stages of one kind")
        s = match_spatial(s, t)
        return {"ce": self.ce(s_out, batch), "hint": self.cfg["hint_weight"] * F.mse_loss(s, t)}
