"""hf_wb: weights and biases as first-class objects of fine-tuning with the Hugging Face Trainer."""

__version__ = "0.1.0"
