"""Models of both papers: G (recovery), P, F, FFSR, RIFE, and PRI composed."""
