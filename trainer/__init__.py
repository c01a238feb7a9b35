"""Fine-tuning and pretraining of BERT-family classifiers (``python -m trainer.run``)."""
