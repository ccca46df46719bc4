"""`python -m stages diagnosis_fit`: rewrite the committed diagnosis_predictor.json (the KD-gain
predictor fit on every condition of the experiments and main datasets, params `diagnosis`), then
write the validation report as `diagnosis_validation` does. Not a DVC stage: the predictor is a
git-tracked input of `diagnose`, refit on purpose and committed (docs/diagnosis.md)."""

from stages._common import main
from stages.diagnosis_validation import run

if __name__ == "__main__":
    main(lambda: run(write_predictor=True))
