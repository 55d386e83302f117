"""Start measured runs of both stacks (or of their models and loader), one at a time on a quiet machine."""
