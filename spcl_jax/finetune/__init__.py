"""Fine-tuning of pre-trained ViTs on labelled chest X-ray sets (Medical MAE's recipe)."""
