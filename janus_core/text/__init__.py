"""Text: chat prompts, conversations, the input processor, incremental detokenization and stop strings."""
