"""Tools on both stacks' outputs: data preparation, checkpoints, evaluation, weight conversion."""
