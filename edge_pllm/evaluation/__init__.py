"""Evaluation: LaMP-format tasks, their metrics, and the harness that runs strategies on them.

lamp      reading a task, and how each task's profile and prompts look
metrics   ROUGE as LaMP computes it, accuracy, MAE/RMSE, paired intervals
evaluate  the harness: strategies on a split, per person, with @other ablations
"""
