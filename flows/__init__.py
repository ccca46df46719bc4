"""Prefect flows that run the DVC pipeline: `flows.pipeline` (one task per DVC stage),
`flows.sweep` (a parameter grid as parallel DVC experiments, on threads or a Dask cluster) and
`flows.deploy` (the nightly "reproduce and check the paper claims" deployment).

Importing this package imports nothing else; each module is a command (`python -m flows.<name>
--help`).
"""
