"""ecomtrain: train LLM-based e-commerce recommenders from behaviour logs."""

__version__ = "0.1.0"
