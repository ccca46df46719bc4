"""The papers' synthetic experiments (MFH, NTDH, digits): batched ensembles of small networks."""
