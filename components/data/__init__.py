"""Datasets: the canonical table, real-layout importers, the synthetic generator,
the MLR / VR / genuine-LR protocols, identity splits, and the torch training Dataset."""
