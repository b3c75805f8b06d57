"""Fine-tuning configs (Medical MAE's recipe): nih14, chexpert, rsna build on common."""
