"""What a person looks at: progress, the summary table, plots and contact sheets."""
