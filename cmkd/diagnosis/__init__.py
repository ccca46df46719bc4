""""Will KD work here?": indicators from a trained teacher and the no-KD student, the KD-gain
predictor fit on them, and the diagnosis stages' reports."""
