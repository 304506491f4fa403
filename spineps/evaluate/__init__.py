"""Evaluation of predicted masks against references (SPINEPS paper section 2.6).

- :mod:`spineps.evaluate.metrics`: Dice, ASSD / HD95 in mm (surface distance transforms)
- :mod:`spineps.evaluate.matching`: optimal IoU matching, RQ / SQ / PQ, instance Dice, level names
- :mod:`spineps.evaluate.stats`: summaries and the paired Wilcoxon comparison
- :mod:`spineps.evaluate.run`: file pairing, annotated classes, per-scan evaluation, tables
- :mod:`spineps.evaluate.cli`: ``add_arguments(parser)`` / ``run(args)`` for ``spineps evaluate``

Importing this package imports nothing heavy (the CLI parser imports ``.cli``).
"""
