"""The training layer: a method's Distiller trained, evaluated and checkpointed, one concern a
module (config, loop, checkpoint, logit cache, distributed, precision, metrics). Knows no method."""
