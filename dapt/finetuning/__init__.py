"""The downstream tasks `stages.finetune` trains and `stages.compare` scores: classification, tagging, retrieval."""
