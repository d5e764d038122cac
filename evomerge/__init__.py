"""evomerge: evolutionary optimization of model-merge recipes.

Data flows one way:  recipe or genome -> candidate weights -> evaluator -> trial record -> optimizer.
"""

__version__ = "0.1.0"
