"""Level naming of vertebra instances.

- :mod:`spineps.labeling.levels`: ``name_levels(semantic, instance, rule=..., anchor=...)``
  -> ``LevelNaming``; ``apply_naming(instance, naming)``.

Nothing is imported here, so importing the package stays cheap.
"""
