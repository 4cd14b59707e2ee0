"""GRPO post-training for reasoning with verifiable answers, on TRL's ``GRPOTrainer`` (see ``runner``)."""
