"""Data-aware and alignment merges: Fisher, RegMean, Git Re-Basin (weight / activation matching), REPAIR.

One idea per module: ``permutation_spec`` (which tensor axes move together), ``weight_matching``,
``activation_matching``, ``repair``, ``fisher``, ``regmean``, ``calibration`` (calibration data), ``causal_lm``
(Hugging Face causal-LM plumbing for alignment) and ``recipe_methods`` (the `merge_method: fisher / regmean`
entry points used by recipes and `evomerge merge`).
"""
