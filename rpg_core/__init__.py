"""rpg-lab core: objectives (gradient-exact KL-regularized policy losses); trainer, evaluation and tracking follow."""

__version__ = "0.1.0"
