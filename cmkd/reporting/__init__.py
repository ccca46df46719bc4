"""Result files -> tables, figures, curves, the papers' claims and the README's blocks. Knows
the results' file format, never how they were computed."""
