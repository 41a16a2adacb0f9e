"""hybrid-post-training: LLM post-training through the Unified Policy Gradient Estimator."""
__version__ = "0.1.0"
