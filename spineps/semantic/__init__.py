"""The semantic phase: pre-processing (``preprocess``), nnU-Net inference over a model
folder (``predict.NnUNetSemanticSegmenter``) and clean-up (``cleanup``).

Nothing heavy is imported here (torch and nnU-Net load only when a model is loaded).
"""
