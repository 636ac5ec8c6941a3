"""Evaluators: the shapes probe, ShapesEval, Frechet distance and classifier judges."""
