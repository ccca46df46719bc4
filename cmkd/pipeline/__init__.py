"""The top layer, what the stage scripts call: every file path (layout), training and tuning
stages, and the per-stage code dependencies DVC tracks (codedeps)."""
