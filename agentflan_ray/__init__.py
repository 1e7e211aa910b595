"""agentflan-ray: Agent-FLAN data generation and fine-tuning on Ray."""

__version__ = "0.1.0"
