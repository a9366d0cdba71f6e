"""`stages.clean`'s blocks: datatrove pipeline steps, one decision each, and the registry behind `clean.steps`."""
