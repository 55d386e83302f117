"""Read the run folders of both stacks and write the comparison report: report.md and its figures."""
