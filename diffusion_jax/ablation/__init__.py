"""The ablation harness: sweep declarations, arm claiming, result tables and plots."""
