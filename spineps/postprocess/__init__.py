"""Post-processing after the instance phase (chained by ``spineps.pipeline.postprocess``).

- :mod:`spineps.postprocess.vertebrae`: the vertebra helpers every later stage shares (ids,
  centroids computed once per scan, frames, grid checks).
- :mod:`spineps.postprocess.consistency`: ``make_consistent(semantic, vertebrae)`` (holes,
  zeroing, orphan components, sacrum) and ``consistency_problems(semantic, instance)``.
- :mod:`spineps.postprocess.discs`: ``assign_discs_and_endplates(semantic, vertebrae)``
  (discs 100+X, endplates 200+X, superior/inferior endplate split 52/53).

Nothing is imported here, so importing the package stays cheap.
"""
