"""Tasks: what is stored for a LaMP-format profile, how its prompts look, how an answer is
scored.

    lamp     reading a task folder, and each task's fields, prompts and answer cleaning
    metrics  ROUGE as LaMP computes it, accuracy, MAE/RMSE, paired intervals
"""
