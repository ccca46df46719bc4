"""AT, attention transfer (Zagoruyko & Komodakis, ICLR 2017).

Per matched stage, the spatial attention map (channel mean of |x|^p, L2-normalised per
sample; `cmkd.losses.at_loss`) of the student is pulled to the teacher's:

    CE + at_weight * sum over stages of mean (A_s - A_t)^2

at_weight 1000 with p = 2 is the authors' code (`beta 1e3` times the sum of the per-group
means; the paper writes beta/2 in front of an unsquared norm) and RepDistiller's. Stages are
matched by name (default: every stage both networks have, except `stem` and `features`, i.e.
the residual groups of a ResNet or the conv blocks of the small CNN); a student map of another
spatial size is resized bilinearly to the teacher's. AT needs spatial maps: vector networks
(MLP) and vector stages are refused with a ConfigError.
"""

from __future__ import annotations

from cmkd.errors import ConfigError
from cmkd.losses import at_loss
from cmkd.methods import register
from cmkd.methods.feature import FeatureDistiller, has_spatial_stages, match_spatial

_NOT_GROUPS = ("stem", "features")


@register("at")
class AT(FeatureDistiller):
    defaults = {"ce_weight": 1.0, "at_weight": 1000.0, "p": 2.0, "stages": "auto"}
    inputs = ("image",)  # in the default tables, n/a on vector datasets (synthetic)

    @classmethod
    def validate(cls, cfg, key):
        super().validate(cfg, key)
        merged = {**cls.defaults, **cfg}
        if not float(merged["p"]) > 0:
            raise ConfigError(f"{key}.p", f"must be > 0, got {merged['p']}")
        stages = merged["stages"]
        if stages != "auto" and (not isinstance(stages, (list, tuple)) or not stages
                                 or not all(isinstance(s, str) for s in stages)):
            raise ConfigError(f"{key}.stages", f"must be 'auto' or a non-empty list of stage names, got {stages!r}")

    def __init__(self, student, teacher, cfg, num_classes):
        super().__init__(student, teacher, cfg, num_classes)
        for role, net in (("student", student), ("teacher", teacher)):
            if not has_spatial_stages(net):
                raise ConfigError(self.key("stages"), f"AT needs spatial feature maps, but the {role} network "
                                  f"({type(net).__name__}) has only vector stages; use fitnet, rkd or crd on vector "
                                  "data")
        if self.cfg["stages"] == "auto":
            t_names = set(teacher.stage_names)
            stages = [n for n in student.stage_names if n in t_names and n not in _NOT_GROUPS]
            if not stages:
                raise ConfigError(self.key("stages"),
                    f"the networks share no stage to match; student: {student.stage_names}, teacher: "
                    f"{teacher.stage_names}")
        else:
            stages = [str(s) for s in self.cfg["stages"]]
            for name in stages:
                self.resolve_stage(student, name, "student", "stages")
                self.resolve_stage(teacher, name, "teacher", "stages")
        self.stages = stages

    def forward(self, batch):
        s_out, t_out = self.run_both(batch, self.stages, self.stages)
        total = 0.0
        for name in self.stages:
            s, t = s_out[name], t_out[name]
            if s.dim() != 4 or t.dim() != 4:
                raise ConfigError(self.key("stages"),
                    f"stage {name!r} is not a spatial map (shapes {tuple(s.shape)} / {tuple(t.shape)}); AT needs [N, "
                    "C, H, W]")
            total = total + at_loss(match_spatial(s, t), t, p=float(self.cfg["p"]))
        return {"ce": self.ce(s_out, batch), "at": self.cfg["at_weight"] * total}
